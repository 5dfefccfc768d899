// Unit tests for the ublk library's pure logic: user_data packing, device-add validation,
// the ADD_DEV and SET_PARAMS payloads, descriptor checks, commit results and the layout of
// the descriptor arrays in /dev/ublkcN.
#include <doctest/doctest.h>

#include <cerrno>
#include <cstdint>
#include <limits>

#include "ublk/params.h"
#include "ublk/user_data.h"

namespace memlend::ublk {
namespace {

DeviceConfig ValidConfig() {
  DeviceConfig config;
  config.size_bytes = 64ull << 20;
  config.queues = 2;
  return config;
}

ublksrv_io_desc Desc(std::uint8_t op, std::uint64_t start, std::uint32_t count,
                     std::uint32_t flags = 0) {
  ublksrv_io_desc desc{};
  desc.op_flags = op | (flags << 8);
  desc.start_sector = start;
  desc.nr_sectors = count;
  return desc;
}

TEST_CASE("user_data round-trips every tag and command") {
  for (unsigned tag : {0u, 1u, 127u, 128u, 4095u}) {
    for (UserDataCommand command :
         {UserDataCommand::kFetch, UserDataCommand::kCommitAndFetch, UserDataCommand::kWake,
          UserDataCommand::kCompleted}) {
      const IoUserData data{static_cast<std::uint16_t>(tag), command};
      const std::uint64_t packed = EncodeUserData(data);
      CHECK((packed >> 32) == 0);
      const auto decoded = DecodeUserData(packed);
      REQUIRE(decoded.has_value());
      CHECK(*decoded == data);
    }
  }
  // Distinct inputs give distinct values.
  CHECK(EncodeUserData({5, UserDataCommand::kFetch}) !=
        EncodeUserData({5, UserDataCommand::kCommitAndFetch}));
  CHECK(EncodeUserData({5, UserDataCommand::kFetch}) !=
        EncodeUserData({6, UserDataCommand::kFetch}));
}

TEST_CASE("user_data that EncodeUserData never produces is rejected") {
  const std::uint64_t good = EncodeUserData({7, UserDataCommand::kFetch});
  CHECK_FALSE(DecodeUserData(0).has_value());
  CHECK_FALSE(DecodeUserData(good | (std::uint64_t{1} << 40)).has_value());  // high bits
  CHECK_FALSE(DecodeUserData((good & ~(std::uint64_t{0xff} << 24)) | (0x55ull << 24)).has_value());
  CHECK_FALSE(DecodeUserData((good & ~(std::uint64_t{0xff} << 16)) | (0x33ull << 16)).has_value());
  CHECK_FALSE(DecodeUserData((good & ~std::uint64_t{0xffff}) | 4096).has_value());  // tag
}

TEST_CASE("ValidateConfig accepts sane settings and names what is wrong") {
  CHECK(ValidateConfig(ValidConfig()) == "");
  DeviceConfig config = ValidConfig();
  config.size_bytes = 4095;
  CHECK(ValidateConfig(config).find("size") != std::string::npos);
  config = ValidConfig();
  config.size_bytes = 0;
  CHECK(ValidateConfig(config) != "");
  config = ValidConfig();
  config.queues = 0;
  CHECK(ValidateConfig(config).find("queue count") != std::string::npos);
  config = ValidConfig();
  config.queue_depth = 0;
  CHECK(ValidateConfig(config).find("depth") != std::string::npos);
  config.queue_depth = UBLK_MAX_QUEUE_DEPTH + 1;
  CHECK(ValidateConfig(config) != "");
  config = ValidConfig();
  config.max_io_bytes = 3 * 4096;
  CHECK(ValidateConfig(config).find("max I/O") != std::string::npos);
  config.max_io_bytes = 2048;
  CHECK(ValidateConfig(config) != "");
  config.max_io_bytes = 2 << 20;
  CHECK(ValidateConfig(config) != "");
  config = ValidConfig();
  config.max_discard_bytes = 1000;
  CHECK(ValidateConfig(config) != "");
  config = ValidConfig();
  config.dev_id = -2;
  CHECK(ValidateConfig(config) != "");
}

TEST_CASE("queue count defaults to one per CPU") {
  DeviceConfig config = ValidConfig();
  config.queues = 0;
  CHECK(ResolveQueueCount(config, 8) == 8);
  CHECK(ResolveQueueCount(config, 0) == 1);
  config.queues = 3;
  CHECK(ResolveQueueCount(config, 8) == 3);
}

TEST_CASE("BuildDevInfo carries queues, depth, buffer size, id and flags") {
  DeviceConfig config = ValidConfig();
  config.queue_depth = 64;
  const ublksrv_ctrl_dev_info info = BuildDevInfo(config, UBLK_F_CMD_IOCTL_ENCODE);
  CHECK(info.nr_hw_queues == 2);
  CHECK(info.queue_depth == 64);
  CHECK(info.max_io_buf_bytes == 256 * 1024);
  CHECK(info.dev_id == std::numeric_limits<std::uint32_t>::max());  // -1: kernel picks
  CHECK(info.flags == UBLK_F_CMD_IOCTL_ENCODE);
  CHECK(info.ublksrv_pid == -1);
  config.dev_id = 3;
  CHECK(BuildDevInfo(config, 0).dev_id == 3);
}

TEST_CASE("BuildParams: 512-byte logical, 4 KiB physical, discard and write zeroes") {
  DeviceConfig config = ValidConfig();
  const ublk_params params = BuildParams(config);
  CHECK(params.len == sizeof(ublk_params));
  CHECK(params.types == (UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD));
  CHECK(params.basic.logical_bs_shift == 9);
  CHECK(params.basic.physical_bs_shift == 12);
  CHECK(params.basic.io_min_shift == 12);
  CHECK(params.basic.io_opt_shift == 18);  // 256 KiB
  CHECK(params.basic.max_sectors == 512);
  CHECK(params.basic.dev_sectors == (64ull << 20) / 512);
  CHECK(params.basic.attrs == 0);
  CHECK(params.discard.discard_granularity == 4096);
  CHECK(params.discard.discard_alignment == 0);
  CHECK(params.discard.max_discard_segments == 1);
  CHECK(params.discard.max_discard_sectors == (1u << 30) / 512);
  CHECK(params.discard.max_write_zeroes_sectors == (1u << 30) / 512);

  config.volatile_cache = true;
  config.max_io_bytes = 4096;
  config.max_discard_bytes = 0;
  config.max_write_zeroes_bytes = std::uint64_t{1} << 50;  // capped to 32-bit sectors
  const ublk_params other = BuildParams(config);
  CHECK(other.basic.attrs == UBLK_ATTR_VOLATILE_CACHE);
  CHECK(other.basic.max_sectors == 8);
  CHECK(other.basic.io_opt_shift == 12);
  CHECK(other.discard.max_discard_sectors == 0);
  CHECK(other.discard.max_write_zeroes_sectors % 8 == 0);
  CHECK(other.discard.max_write_zeroes_sectors > (1u << 31));

  config.max_discard_bytes = 0;
  config.max_write_zeroes_bytes = 0;
  CHECK(BuildParams(config).types == UBLK_PARAM_TYPE_BASIC);
}

TEST_CASE("Log2 of powers of two") {
  CHECK(Log2(1) == 0);
  CHECK(Log2(4096) == 12);
  CHECK(Log2(std::uint64_t{1} << 40) == 40);
}

TEST_CASE("CheckDescriptor maps ops and keeps the range") {
  const DescriptorLimits limits{1000, 64 * 1024};
  DescriptorCheck check = CheckDescriptor(Desc(UBLK_IO_OP_READ, 8, 16), limits);
  CHECK(check.error == 0);
  CHECK(check.request.op == IoOp::kRead);
  CHECK(check.request.start_sector == 8);
  CHECK(check.request.sector_count == 16);
  CHECK(check.request.buffer.empty());
  check = CheckDescriptor(Desc(UBLK_IO_OP_WRITE, 0, 128, UBLK_IO_F_FUA >> 8), limits);
  CHECK(check.error == 0);
  CHECK(check.request.op == IoOp::kWrite);
  CHECK(check.request.flags == (UBLK_IO_F_FUA >> 8));
  CHECK(CheckDescriptor(Desc(UBLK_IO_OP_DISCARD, 992, 8), limits).request.op == IoOp::kDiscard);
  CHECK(CheckDescriptor(Desc(UBLK_IO_OP_WRITE_ZEROES, 0, 1000), limits).request.op ==
        IoOp::kWriteZeroes);
  // FLUSH carries no range; whatever the descriptor says is ignored.
  check = CheckDescriptor(Desc(UBLK_IO_OP_FLUSH, 123456, 99), limits);
  CHECK(check.error == 0);
  CHECK(check.request.op == IoOp::kFlush);
  CHECK(check.request.sector_count == 0);
}

TEST_CASE("CheckDescriptor refuses bad ops, ranges and sizes") {
  const DescriptorLimits limits{1000, 64 * 1024};
  CHECK(CheckDescriptor(Desc(UBLK_IO_OP_WRITE_SAME, 0, 8), limits).error == -EOPNOTSUPP);
  CHECK(CheckDescriptor(Desc(0x7f, 0, 8), limits).error == -EOPNOTSUPP);
  CHECK(CheckDescriptor(Desc(UBLK_IO_OP_READ, 0, 0), limits).error == -EINVAL);
  CHECK(CheckDescriptor(Desc(UBLK_IO_OP_READ, 993, 8), limits).error == -EINVAL);
  CHECK(CheckDescriptor(Desc(UBLK_IO_OP_READ, 1000, 1), limits).error == -EINVAL);
  CHECK(CheckDescriptor(Desc(UBLK_IO_OP_DISCARD, ~std::uint64_t{0} - 2, 8), limits).error ==
        -EINVAL);  // would wrap around
  CHECK(CheckDescriptor(Desc(UBLK_IO_OP_WRITE, 0, 129), limits).error == -EINVAL);  // > buffer
  // Discard and write zeroes use no buffer, so they may be larger than one.
  CHECK(CheckDescriptor(Desc(UBLK_IO_OP_DISCARD, 0, 1000), limits).error == 0);
}

TEST_CASE("CommitResult keeps the kernel from reissuing forever") {
  CHECK(CommitResult(IoOp::kRead, 4096, 4096) == 4096);
  CHECK(CommitResult(IoOp::kRead, 4096, 8192) == 4096);
  CHECK(CommitResult(IoOp::kWrite, 4096, 512) == 512);
  CHECK(CommitResult(IoOp::kWrite, 4096, 0) == -EIO);
  CHECK(CommitResult(IoOp::kRead, 4096, -ENOSPC) == -ENOSPC);
  CHECK(CommitResult(IoOp::kDiscard, 0, 0) == 0);
  CHECK(CommitResult(IoOp::kFlush, 0, 12) == 0);
  CHECK(CommitResult(IoOp::kWriteZeroes, 0, -EIO) == -EIO);
}

TEST_CASE("descriptor arrays sit one maximal, page-rounded slot per queue") {
  // 4096 descriptors of 24 bytes = 98304 bytes = 24 pages.
  CHECK(DescriptorArrayOffset(0, 4096) == 0);
  CHECK(DescriptorArrayOffset(1, 4096) == 98304);
  CHECK(DescriptorArrayOffset(3, 4096) == 3 * 98304);
  CHECK(DescriptorArrayLength(128, 4096) == 4096);  // 3072 bytes, rounded up
  CHECK(DescriptorArrayLength(171, 4096) == 8192);
  CHECK(DescriptorArrayLength(4096, 4096) == 98304);
}

}  // namespace
}  // namespace memlend::ublk
