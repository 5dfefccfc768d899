#include "frontend/ublk_frontend.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/log.h"
#include "frontend/deferred_io.h"
#include "frontend/host_tools.h"
#include "ublk/server.h"

namespace memlend {
namespace {

class UblkFrontend final : public BlockFrontend, private ublk::Target {
 public:
  explicit UblkFrontend(std::shared_ptr<Device> device) : device_(std::move(device)) {}
  // A detach that cannot happen cleanly (the device is still in use) is forced: the
  // kernel removes the disk under its users, whose further I/O fails.
  ~UblkFrontend() override {
    if (server_) server_->Stop();
  }

  // Control thread. Returns "" once the device runs, else a one-line reason.
  std::string Attach(const UblkOptions& options) {
    ublk::DeviceConfig config;
    config.size_bytes = device_->size_bytes();
    // The queue count is settled here, so that the DeferredIo's inbox holds every tag (the
    // kernel may grant fewer queues and a lower depth, never more).
    const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
    config.queues = options.queues;
    config.queues = ublk::ResolveQueueCount(config, cpus > 0 ? static_cast<unsigned>(cpus) : 1);
    try {
      deferred_ = std::make_unique<DeferredIo>(
          *device_, static_cast<unsigned>(std::min<std::uint64_t>(
                        std::uint64_t{config.queues} * options.queue_depth, 1u << 20)),
          options.realtime);
    } catch (const std::exception& e) {
      // The queues then serve every request themselves.
      LogError("warning: ublk: requests that wait for peers are served on the queues' own "
               "threads: %s", e.what());
    }
    config.queue_depth = options.queue_depth;
    config.max_io_bytes = options.max_io_bytes;
    config.lock_memory = options.lock_memory;
    config.pin_queues = options.pin_queues;
    config.realtime = options.realtime;
    config.user_recovery = options.user_recovery || options.recover_dev_id >= 0;
    std::string error;
    if (options.recover_dev_id >= 0) {
      config.dev_id = options.recover_dev_id;
      server_ = ublk::UblkServer::Recover(config, *this, &error);
    } else {
      server_ = ublk::UblkServer::Start(config, *this, &error);
    }
    if (!server_) return error;
    path_ = server_->block_path();
    if (options.recover_dev_id >= 0) {
      LogError("ublk: %s: the kernel held it for this daemon; taken over after waiting %llu ms "
               "for it to be quiesced",
               path_.c_str(), static_cast<unsigned long long>(server_->recovery_wait_ms()));
    }
    if (server_->realtime_refused()) {
      LogError("warning: ublk: %s: no real-time scheduling (needs CAP_SYS_NICE): under memory "
               "pressure, swap on it may stall", path_.c_str());
    }
    if (const int ret = frontend::UseNoIoScheduler(path_); ret < 0) {
      LogDebug("ublk: %s: cannot turn off its I/O scheduler: %s", path_.c_str(),
               std::strerror(-ret));
    }
    if (const int ret = frontend::UseNoWritebackThrottling(path_); ret < 0) {
      LogDebug("ublk: %s: cannot turn off writeback throttling: %s", path_.c_str(),
               std::strerror(-ret));
    }
    LogDebug("ublk: %s serves device %s with %u queue(s) of depth %u%s", path_.c_str(),
             device_->name().c_str(), server_->config().queues, server_->config().queue_depth,
             server_->legacy_encoding() ? " (legacy opcodes)" : "");
    return "";
  }

  std::string_view kind() const override { return "ublk"; }
  const std::string& path() const override { return path_; }

  int Detach() noexcept override {
    if (!server_ || !server_->running()) return 0;
    // An exclusive open fails with EBUSY while the disk is mounted or swapped on. The
    // probe is closed again at once: an open disk would keep DEL_DEV waiting.
    const int probe = ::open(path_.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC);
    if (probe < 0 && errno == EBUSY) return -EBUSY;
    if (probe >= 0) ::close(probe);
    const int ret = server_->Stop();
    if (ret < 0) LogError("ublk: removing %s: %s", path_.c_str(), std::strerror(-ret));
    return ret;
  }

 private:
  int HandleIo(const ublk::IoRequest& request) noexcept override {
    return ServeUblkRequest(*device_, request);
  }
  // Requests that can be served from the local store are served now; the others go to the
  // device's DeferredIo, which completes them when their pages have come (or gone).
  void HandleBatch(std::span<const ublk::IoRequest> requests,
                   std::span<int> results) noexcept override {
    DeferredIo* deferred = deferred_.get();
    ublk::IoRequest waiting[kMaxDeferredBatch];
    std::size_t waiting_count = 0;
    for (std::size_t i = 0; i < requests.size(); ++i) {
      if (deferred != nullptr && UblkRequestMustWait(*device_, requests[i])) {
        waiting[waiting_count++] = requests[i];
        results[i] = ublk::kIoDeferred;
        if (waiting_count == kMaxDeferredBatch) {
          deferred->Submit(std::span(waiting, waiting_count));
          waiting_count = 0;
        }
        continue;
      }
      results[i] = ServeUblkRequest(*device_, requests[i]);
    }
    if (waiting_count > 0) deferred->Submit(std::span(waiting, waiting_count));
    // A read of a trigger page asked for pages to be fetched ahead: that is the DeferredIo
    // thread's work too.
    if (deferred != nullptr && device_->ReadAheadWanted()) deferred->Kick();
  }
  // Every queue that started runs QueueStarted before Start returns, and QueueStopped only
  // once the device is stopping; the kernel may have granted fewer queues than asked.
  void QueueStarted(unsigned /*queue*/) noexcept override { started_queues_.fetch_add(1); }
  void QueueStopped(unsigned /*queue*/) noexcept override {
    // Every queue has stopped handing over requests once the last one stops; then the
    // requests still held are served and completed and the thread ends, while every
    // queue's IoCompleter is still there (UblkServer::Stop frees them after the threads).
    if (stopped_queues_.fetch_add(1) + 1 == started_queues_.load()) deferred_.reset();
  }

  static constexpr std::size_t kMaxDeferredBatch = 64;  // handed over per Submit
  const std::shared_ptr<Device> device_;
  std::atomic<unsigned> started_queues_{0};
  std::atomic<unsigned> stopped_queues_{0};
  // Serves, for every queue, the requests that wait for a lower tier. Made before the
  // queues start; ended by the last queue to stop (or, if the server never started, with
  // the frontend).
  std::unique_ptr<DeferredIo> deferred_;
  std::unique_ptr<ublk::UblkServer> server_;
  std::string path_;
};

}  // namespace

bool UblkAvailable() noexcept { return ::access("/dev/ublk-control", F_OK) == 0; }

int RemoveOrphanUblk(int dev_id, std::string* error) {
  return ublk::UblkServer::RemoveOrphan(dev_id, error);
}

std::optional<ByteRange> SectorsToBytes(std::uint64_t start_sector, std::uint32_t sector_count,
                                        std::uint64_t device_size_bytes) noexcept {
  const std::uint64_t device_sectors = device_size_bytes >> ublk::kSectorShift;
  if (sector_count == 0 || start_sector > device_sectors ||
      sector_count > device_sectors - start_sector) {
    return std::nullopt;
  }
  return ByteRange{start_sector << ublk::kSectorShift,
                   std::uint64_t{sector_count} << ublk::kSectorShift};
}

int ServeUblkRequest(Device& device, const ublk::IoRequest& request) noexcept {
  if (request.op == ublk::IoOp::kFlush) return device.Flush();
  const std::optional<ByteRange> range =
      SectorsToBytes(request.start_sector, request.sector_count, device.size_bytes());
  if (!range) return -EINVAL;
  int ret;
  switch (request.op) {
    case ublk::IoOp::kRead:
      if (request.buffer.size() != range->length) return -EINVAL;
      ret = device.Read(range->offset, request.buffer);
      return ret < 0 ? ret : static_cast<int>(range->length);
    case ublk::IoOp::kWrite:
      if (request.buffer.size() != range->length) return -EINVAL;
      ret = device.Write(range->offset, request.buffer);
      return ret < 0 ? ret : static_cast<int>(range->length);
    case ublk::IoOp::kDiscard:
      return device.Trim(range->offset, range->length);
    case ublk::IoOp::kWriteZeroes:
      return device.WriteZeroes(range->offset, range->length);
    case ublk::IoOp::kFlush:
      break;
  }
  return -EOPNOTSUPP;
}

void ServeUblkBatch(Device& device, std::span<const ublk::IoRequest> requests,
                    std::span<int> results) noexcept {
  // Per thread, kept between batches: at most one entry per tag.
  thread_local std::vector<Device::ReadRequest> reads;
  thread_local std::vector<std::size_t> read_index;
  thread_local std::vector<Device::WriteRequest> writes;
  thread_local std::vector<std::size_t> write_index;
  reads.clear();
  read_index.clear();
  writes.clear();
  write_index.clear();
  for (std::size_t i = 0; i < requests.size(); ++i) {
    const ublk::IoRequest& request = requests[i];
    if (request.op != ublk::IoOp::kRead && request.op != ublk::IoOp::kWrite) {
      results[i] = ServeUblkRequest(device, request);
      continue;
    }
    const std::optional<ByteRange> range =
        SectorsToBytes(request.start_sector, request.sector_count, device.size_bytes());
    if (!range || request.buffer.size() != range->length) {
      results[i] = -EINVAL;
      continue;
    }
    try {
      if (request.op == ublk::IoOp::kRead) {
        reads.push_back({range->offset, request.buffer, 0});
        read_index.push_back(i);
      } else {
        writes.push_back({range->offset, request.buffer, 0});
        write_index.push_back(i);
      }
    } catch (const std::bad_alloc&) {
      results[i] = ServeUblkRequest(device, request);  // served alone, without the batch
    }
  }
  // Reads first: someone usually waits for them (a page fault), while writes (swap-out,
  // writeback) are waited for by nobody in particular.
  if (!reads.empty()) device.ReadMany(reads);
  for (std::size_t r = 0; r < reads.size(); ++r) {
    results[read_index[r]] =
        reads[r].result < 0 ? reads[r].result : static_cast<int>(reads[r].out.size());
  }
  if (!writes.empty()) device.WriteMany(writes);
  for (std::size_t w = 0; w < writes.size(); ++w) {
    results[write_index[w]] =
        writes[w].result < 0 ? writes[w].result : static_cast<int>(writes[w].data.size());
  }
}

bool UblkRequestMustWait(const Device& device, const ublk::IoRequest& request) noexcept {
  if (request.op != ublk::IoOp::kRead && request.op != ublk::IoOp::kWrite) return false;
  const std::optional<ByteRange> range =
      SectorsToBytes(request.start_sector, request.sector_count, device.size_bytes());
  if (!range) return false;  // refused at once
  return request.op == ublk::IoOp::kRead ? !device.ReadIsAtHand(range->offset, range->length)
                                         : device.WritesGoAround();
}

std::unique_ptr<BlockFrontend> AttachUblk(std::shared_ptr<Device> device,
                                          const UblkOptions& options) {
  if (!device) throw std::runtime_error("ublk: no device to attach");
  auto frontend = std::make_unique<UblkFrontend>(std::move(device));
  std::string error = frontend->Attach(options);
  if (!error.empty()) throw std::runtime_error(error);
  return frontend;
}

}  // namespace memlend
