#include "common/size.h"

#include <doctest/doctest.h>

using memlend::FormatSize;
using memlend::ParseSize;

TEST_CASE("ParseSize accepts plain numbers and binary suffixes") {
  CHECK(ParseSize("0") == 0u);
  CHECK(ParseSize("4096") == 4096u);
  CHECK(ParseSize("64K") == 65536u);
  CHECK(ParseSize("64k") == 65536u);
  CHECK(ParseSize("1KiB") == 1024u);
  CHECK(ParseSize("1KB") == 1024u);
  CHECK(ParseSize("512M") == 512ull << 20);
  CHECK(ParseSize("2G") == 2ull << 30);
  CHECK(ParseSize("3T") == 3ull << 40);
  CHECK(ParseSize("100B") == 100u);
}

TEST_CASE("ParseSize rejects malformed text and overflow") {
  for (const char* bad : {"", "K", "-1", "+1", "1.5G", "12Q", "1 G", "1GG", "1Bi", "1KBB",
                          "99999999999999999999", "17179869184G"}) {
    CAPTURE(bad);
    CHECK_FALSE(ParseSize(bad).has_value());
  }
  CHECK(ParseSize("16777215T") == 16777215ull << 40);
}

TEST_CASE("FormatSize picks a readable unit") {
  CHECK(FormatSize(0) == "0 B");
  CHECK(FormatSize(1023) == "1023 B");
  CHECK(FormatSize(4096) == "4.0 KiB");
  CHECK(FormatSize(3ull << 29) == "1.5 GiB");
}
