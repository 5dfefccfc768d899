#include "workload.h"

#include <sstream>
#include <vector>

namespace memlend::integration {

std::ostream& operator<<(std::ostream& out, const Extent& e) {
  return out << "[" << e.offset << ", +" << e.length << ")";
}

Extent RandomExtent(std::mt19937_64& rng, uint64_t base, uint64_t size) {
  Extent e;
  switch (RandomIn(rng, 0, 9)) {
    case 0:
    case 1:
    case 2:  // sub-page
      e.length = RandomIn(rng, 1, kPageSize - 1);
      e.offset = RandomIn(rng, 0, size - e.length);
      break;
    case 3:
    case 4:
    case 5: {  // aligned pages
      uint64_t pages = RandomIn(rng, 1, 32);
      uint64_t first = RandomIn(rng, 0, size / kPageSize - pages);
      e.offset = first * kPageSize;
      e.length = pages * kPageSize;
      break;
    }
    case 6:
    case 7:
    case 8:  // unaligned, several pages
      e.length = RandomIn(rng, kPageSize + 1, 256 * kKiB);
      e.offset = RandomIn(rng, 0, size - e.length);
      break;
    default:  // up to the very end
      e.length = RandomIn(rng, 1, 64 * kKiB);
      e.offset = size - e.length;
      break;
  }
  e.offset += base;
  return e;
}

Content RandomContent(std::mt19937_64& rng) {
  switch (RandomIn(rng, 0, 9)) {
    case 0:
      return Content::kZeros;
    case 1:
    case 2:
      return Content::kRepeatedByte;
    case 3:
    case 4:
      return Content::kText;
    default:
      return Content::kRandom;
  }
}

std::string RandomIoSession(NbdClient& client, ShadowDevice& shadow, uint64_t base, uint64_t size,
                            int operations, std::mt19937_64& rng) {
  std::vector<uint8_t> buffer;
  try {
    for (int i = 0; i < operations; ++i) {
      Extent e = RandomExtent(rng, base, size);
      buffer.resize(e.length);
      std::span<uint8_t> data(buffer);
      uint64_t kind = RandomIn(rng, 0, 19);
      if (kind < 8) {
        FillContent(rng, data, RandomContent(rng));
        uint32_t flags = RandomIn(rng, 0, 3) == 0 ? LIBNBD_CMD_FLAG_FUA : 0;
        client.Write(data, e.offset, flags);
        shadow.Write(e.offset, data);
      } else if (kind < 16) {
        client.Read(data, e.offset);
        std::string mismatch = DescribeMismatch(shadow.Range(e.offset, e.length), data, e.offset);
        if (!mismatch.empty()) {
          std::ostringstream text;
          text << "operation " << i << ", read " << e << ": " << mismatch;
          return text.str();
        }
      } else if (kind < 18) {
        client.Zero(e.length, e.offset);
        shadow.Zero(e.offset, e.length);
      } else if (kind < 19) {
        client.Trim(e.length, e.offset);
        shadow.Zero(e.offset, e.length);  // memlend's TRIM reads back zeros
      } else {
        client.Flush();
      }
    }
    std::string mismatch = CompareWithShadow(client, shadow, base, size);
    if (!mismatch.empty()) return "final read-back: " + mismatch;
  } catch (const std::exception& error) {
    return error.what();
  }
  return "";
}

}  // namespace memlend::integration
