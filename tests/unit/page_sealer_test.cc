// PageSealer: a sealed page opens only with its own key, binding and tag; whatever a lender
// could do to it (flip a bit, return another page's bytes or an older version, keep the
// bytes but forge the binding) makes Open fail and leaves zeros, never unverified bytes.
#include "store/page_sealer.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <random>
#include <vector>

namespace memlend {
namespace {

using Bytes = std::vector<std::byte>;

Bytes RandomPage(std::uint64_t seed) {
  Bytes page(kPageSize);
  std::mt19937_64 rng(seed);
  for (std::byte& b : page) b = static_cast<std::byte>(rng());
  return page;
}

ConstPageSpan Const(const Bytes& bytes) { return ConstPageSpan(bytes.data(), kPageSize); }
PageSpan Mutable(Bytes& bytes) { return PageSpan(bytes.data(), kPageSize); }

bool AllZero(const Bytes& bytes) {
  return std::all_of(bytes.begin(), bytes.end(), [](std::byte b) { return b == std::byte{0}; });
}

}  // namespace

TEST_CASE("a sealed page opens with its binding and tag, and is not the plaintext") {
  const PageSealer sealer(PageSealer::NewKey(), 1);
  const Bytes page = RandomPage(1);
  const PageSealer::Binding binding{0x1111, 42, 7};
  Bytes sealed(kPageSize);
  PageSealer::Tag tag{};
  REQUIRE(sealer.Seal(Const(page), Mutable(sealed), binding, &tag));
  CHECK(sealed != page);
  Bytes opened(kPageSize);
  REQUIRE(sealer.Open(Const(sealed), Mutable(opened), binding, tag) == 0);
  CHECK(opened == page);
  // In place, both ways.
  Bytes buffer = page;
  REQUIRE(sealer.Seal(Const(buffer), Mutable(buffer), binding, &tag));
  CHECK(buffer == sealed);  // the same key, nonce and data: the same bytes
  REQUIRE(sealer.Open(Const(buffer), Mutable(buffer), binding, tag) == 0);
  CHECK(buffer == page);
  // A page of zeros does not look like zeros once sealed (a marker cannot show through).
  const Bytes zeros(kPageSize, std::byte{0});
  REQUIRE(sealer.Seal(Const(zeros), Mutable(sealed), {0x1111, 43, 8}, &tag));
  CHECK_FALSE(AllZero(sealed));
}

TEST_CASE("whatever a lender does to a sealed page, it does not open") {
  const PageSealer sealer(PageSealer::NewKey(), 1);
  const PageSealer::Binding binding{0x1111, 42, 7};
  const Bytes page = RandomPage(2);
  Bytes sealed(kPageSize);
  PageSealer::Tag tag{};
  REQUIRE(sealer.Seal(Const(page), Mutable(sealed), binding, &tag));
  Bytes out(kPageSize);

  SUBCASE("a bit flipped anywhere in the page") {
    for (const std::size_t at : {std::size_t{0}, std::size_t{1000}, kPageSize - 1}) {
      Bytes changed = sealed;
      changed[at] ^= std::byte{0x10};
      out.assign(kPageSize, std::byte{0xee});
      CHECK(sealer.Open(Const(changed), Mutable(out), binding, tag) == -EBADMSG);
      CHECK(AllZero(out));
    }
  }
  SUBCASE("another page's bytes (a swap), with this page's binding and tag") {
    Bytes other(kPageSize);
    PageSealer::Tag other_tag{};
    REQUIRE(sealer.Seal(Const(RandomPage(3)), Mutable(other), {0x1111, 43, 8}, &other_tag));
    CHECK(sealer.Open(Const(other), Mutable(out), binding, tag) == -EBADMSG);
    CHECK(AllZero(out));
  }
  SUBCASE("an older version of the same page (a replay)") {
    Bytes newer(kPageSize);
    PageSealer::Tag newer_tag{};
    const PageSealer::Binding next{0x1111, 42, 9};
    REQUIRE(sealer.Seal(Const(RandomPage(4)), Mutable(newer), next, &newer_tag));
    // The lender returns the old bytes where the new ones were asked for.
    CHECK(sealer.Open(Const(sealed), Mutable(out), next, newer_tag) == -EBADMSG);
    CHECK(sealer.Open(Const(sealed), Mutable(out), next, tag) == -EBADMSG);
  }
  SUBCASE("the right bytes under another binding: placement, node, counter") {
    CHECK(sealer.Open(Const(sealed), Mutable(out), {0x1111, 41, 7}, tag) == -EBADMSG);
    CHECK(sealer.Open(Const(sealed), Mutable(out), {0x2222, 42, 7}, tag) == -EBADMSG);
    CHECK(sealer.Open(Const(sealed), Mutable(out), {0x1111, 42, 8}, tag) == -EBADMSG);
  }
  SUBCASE("a changed tag, another key, another salt") {
    PageSealer::Tag forged = tag;
    forged[15] ^= 1;
    CHECK(sealer.Open(Const(sealed), Mutable(out), binding, forged) == -EBADMSG);
    const PageSealer other_key(PageSealer::NewKey(), 1);
    CHECK(other_key.Open(Const(sealed), Mutable(out), binding, tag) == -EBADMSG);
    const PageSealer other_salt(PageSealer::Key{}, 2);
    const PageSealer zero_key(PageSealer::Key{}, 1);
    REQUIRE(zero_key.Seal(Const(page), Mutable(out), binding, &forged));
    CHECK(other_salt.Open(Const(out), Mutable(out), binding, forged) == -EBADMSG);
  }
  // And the untouched page still opens.
  REQUIRE(sealer.Open(Const(sealed), Mutable(out), binding, tag) == 0);
  CHECK(out == page);
}

TEST_CASE("new keys differ") {
  CHECK(PageSealer::NewKey() != PageSealer::NewKey());
}

}  // namespace memlend
