#include "ublk/params.h"

#include <cerrno>
#include <cstring>
#include <limits>

namespace memlend::ublk {
namespace {

constexpr std::uint64_t kBlockSize = 4096;
constexpr unsigned kLogicalBlockShift = 9;    // 512-byte logical blocks
constexpr unsigned kPhysicalBlockShift = 12;  // 4096-byte pages underneath
constexpr std::uint32_t kMinIoBytes = 4096;
constexpr std::uint32_t kMaxIoBytes = 1024 * 1024;
constexpr std::uint64_t kDescriptorBytes = sizeof(ublksrv_io_desc);

bool IsPowerOfTwo(std::uint64_t value) { return value != 0 && (value & (value - 1)) == 0; }

std::uint64_t RoundUp(std::uint64_t value, std::uint64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Discard limits are in sectors and must fit the kernel's 32-bit fields.
std::uint32_t SectorLimit(std::uint64_t bytes) {
  const std::uint64_t sectors = bytes >> kSectorShift;
  const std::uint64_t cap = std::numeric_limits<std::uint32_t>::max() & ~std::uint64_t{7};
  return static_cast<std::uint32_t>(sectors < cap ? sectors : cap);
}

}  // namespace

unsigned Log2(std::uint64_t value) noexcept {
  unsigned shift = 0;
  while (value > 1) {
    value >>= 1;
    ++shift;
  }
  return shift;
}

unsigned ResolveQueueCount(const DeviceConfig& config, unsigned online_cpus) noexcept {
  if (config.queues != 0) return config.queues;
  return online_cpus == 0 ? 1 : online_cpus;
}

std::string ValidateConfig(const DeviceConfig& config) {
  if (config.size_bytes == 0 || config.size_bytes % kBlockSize != 0) {
    return "device size must be a positive multiple of 4096 bytes";
  }
  if (config.queues == 0 || config.queues > UBLK_MAX_NR_QUEUES) {
    return "queue count must be 1.." + std::to_string(UBLK_MAX_NR_QUEUES);
  }
  if (config.queue_depth == 0 || config.queue_depth > UBLK_MAX_QUEUE_DEPTH) {
    return "queue depth must be 1.." + std::to_string(UBLK_MAX_QUEUE_DEPTH);
  }
  if (!IsPowerOfTwo(config.max_io_bytes) || config.max_io_bytes < kMinIoBytes ||
      config.max_io_bytes > kMaxIoBytes) {
    return "max I/O size must be a power of two from 4 KiB to 1 MiB";
  }
  if (config.max_discard_bytes % kBlockSize != 0 ||
      config.max_write_zeroes_bytes % kBlockSize != 0) {
    return "discard and write-zeroes limits must be multiples of 4096 bytes";
  }
  if (config.dev_id < -1) return "device id must be -1 (any) or a number";
  return "";
}

ublksrv_ctrl_dev_info BuildDevInfo(const DeviceConfig& config, std::uint64_t flags) noexcept {
  ublksrv_ctrl_dev_info info;
  std::memset(&info, 0, sizeof(info));
  info.nr_hw_queues = static_cast<__u16>(config.queues);
  info.queue_depth = static_cast<__u16>(config.queue_depth);
  info.max_io_buf_bytes = config.max_io_bytes;
  // -1 asks the kernel to choose; the header's dev_id must carry the same value.
  info.dev_id = static_cast<__u32>(config.dev_id);
  info.ublksrv_pid = -1;
  info.flags = flags;
  return info;
}

ublk_params BuildParams(const DeviceConfig& config) noexcept {
  ublk_params params;
  std::memset(&params, 0, sizeof(params));
  params.len = sizeof(params);
  params.types = UBLK_PARAM_TYPE_BASIC;

  ublk_param_basic& basic = params.basic;
  basic.attrs = config.volatile_cache ? UBLK_ATTR_VOLATILE_CACHE : 0;
  basic.logical_bs_shift = kLogicalBlockShift;
  basic.physical_bs_shift = kPhysicalBlockShift;
  basic.io_min_shift = kPhysicalBlockShift;
  basic.io_opt_shift = static_cast<__u8>(Log2(config.max_io_bytes));
  basic.max_sectors = config.max_io_bytes >> kSectorShift;
  basic.dev_sectors = config.size_bytes >> kSectorShift;

  if (config.max_discard_bytes != 0 || config.max_write_zeroes_bytes != 0) {
    params.types |= UBLK_PARAM_TYPE_DISCARD;
    ublk_param_discard& discard = params.discard;
    discard.discard_alignment = 0;
    discard.discard_granularity = kBlockSize;
    discard.max_discard_sectors = SectorLimit(config.max_discard_bytes);
    discard.max_write_zeroes_sectors = SectorLimit(config.max_write_zeroes_bytes);
    // The driver serves single-segment discards only.
    discard.max_discard_segments = 1;
  }
  return params;
}

DescriptorCheck CheckDescriptor(const ublksrv_io_desc& desc,
                                const DescriptorLimits& limits) noexcept {
  DescriptorCheck check;
  IoRequest& request = check.request;
  request.flags = desc.op_flags >> 8;
  request.start_sector = desc.start_sector;
  request.sector_count = desc.nr_sectors;
  switch (desc.op_flags & 0xff) {
    case UBLK_IO_OP_READ:
      request.op = IoOp::kRead;
      break;
    case UBLK_IO_OP_WRITE:
      request.op = IoOp::kWrite;
      break;
    case UBLK_IO_OP_FLUSH:
      request.op = IoOp::kFlush;
      break;
    case UBLK_IO_OP_DISCARD:
      request.op = IoOp::kDiscard;
      break;
    case UBLK_IO_OP_WRITE_ZEROES:
      request.op = IoOp::kWriteZeroes;
      break;
    default:
      check.error = -EOPNOTSUPP;
      return check;
  }
  if (request.op == IoOp::kFlush) {
    request.start_sector = 0;
    request.sector_count = 0;
    return check;
  }
  // Written so that no addition can overflow: start <= total and count <= total - start.
  if (desc.nr_sectors == 0 || desc.start_sector > limits.device_sectors ||
      desc.nr_sectors > limits.device_sectors - desc.start_sector) {
    check.error = -EINVAL;
    return check;
  }
  if ((request.op == IoOp::kRead || request.op == IoOp::kWrite) &&
      std::uint64_t{desc.nr_sectors} << kSectorShift > limits.max_io_bytes) {
    check.error = -EINVAL;
  }
  return check;
}

int CommitResult(IoOp op, std::uint32_t request_bytes, int result) noexcept {
  if (result < 0) return result;
  if (op == IoOp::kRead || op == IoOp::kWrite) {
    if (result == 0) return -EIO;
    const auto bytes = static_cast<std::uint32_t>(result);
    return static_cast<int>(bytes < request_bytes ? bytes : request_bytes);
  }
  return 0;
}

std::uint64_t DescriptorArrayOffset(unsigned queue, std::uint64_t page_size) noexcept {
  return UBLKSRV_CMD_BUF_OFFSET +
         std::uint64_t{queue} * RoundUp(UBLK_MAX_QUEUE_DEPTH * kDescriptorBytes, page_size);
}

std::uint64_t DescriptorArrayLength(unsigned queue_depth, std::uint64_t page_size) noexcept {
  return RoundUp(std::uint64_t{queue_depth} * kDescriptorBytes, page_size);
}

}  // namespace memlend::ublk
