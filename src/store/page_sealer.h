// PageSealer: encrypts and authenticates a 4 KiB page before it leaves the host, and opens
// it again when it comes back (docs/security.md, "Pages sealed before they leave the host").
//
// AES-256-GCM through OpenSSL's EVP interface (AES-NI where the CPU has it), under a key
// that never leaves the borrower. The ciphertext is exactly kPageSize bytes, so a lender
// stores what it stored before; the 16-byte tag stays with the caller (in the page's
// placement record), so a lender cannot substitute one. A seal is bound to a Binding: the
// nonce is the key's 32-bit salt and the 64-bit seal counter, and the associated data is
// the borrower's node id, the placement id and the counter, so bytes of another page, of an
// older version of this page, or of another borrower fail to open.
//
// Nonces must never repeat under one key: the caller gives every seal a counter value of
// its own (SealCounter hands them out). Thread-safe: each thread keeps its own cipher
// context.
#pragma once

#include <array>
#include <cstdint>

#include "memlend/page_store.h"

namespace memlend {

class PageSealer {
 public:
  static constexpr std::size_t kKeyBytes = 32;
  static constexpr std::size_t kTagBytes = 16;
  using Key = std::array<std::uint8_t, kKeyBytes>;
  using Tag = std::array<std::uint8_t, kTagBytes>;

  // What one seal is bound to.
  struct Binding {
    std::uint64_t node_id = 0;    // the borrower's
    std::uint64_t placement = 0;  // the page's placement id
    std::uint64_t counter = 0;    // this seal's counter value: unique under the key
  };

  // A new random key (getrandom). Throws std::system_error if the kernel cannot give one.
  static Key NewKey();

  // `salt`: 32 bits of every nonce under this key (any fixed value; two sealers sharing a
  // key must have different salts).
  PageSealer(const Key& key, std::uint32_t salt) noexcept : key_(key), salt_(salt) {}
  ~PageSealer();
  PageSealer(const PageSealer&) = delete;
  PageSealer& operator=(const PageSealer&) = delete;

  // Encrypts the page `in` into `out` (which may be `in` itself) and sets *tag. False only
  // if OpenSSL fails (out of memory); `out` is then zeroed.
  bool Seal(ConstPageSpan in, PageSpan out, const Binding& binding, Tag* tag) const noexcept;
  // Decrypts `in` into `out` (which may be `in` itself) and checks it against `tag` and
  // `binding`. Returns 0; -EBADMSG when it does not match (the bytes were changed, or are
  // another page's, another version's or another key's); -ENOMEM when OpenSSL failed here
  // (nothing is known of the page). On failure `out` is zeroed, never left holding
  // unverified bytes.
  int Open(ConstPageSpan in, PageSpan out, const Binding& binding, const Tag& tag) const noexcept;

 private:
  Key key_;  // wiped when the sealer goes
  const std::uint32_t salt_;
};

}  // namespace memlend
