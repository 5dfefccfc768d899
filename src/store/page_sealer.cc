#include "store/page_sealer.h"

#include <openssl/evp.h>
#include <sys/random.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <system_error>

namespace memlend {
namespace {

constexpr std::size_t kNonceBytes = 12;  // GCM's own size: no extra hashing of the nonce
constexpr std::size_t kAadBytes = 24;

// One cipher context per thread, made on first use (again after a failure to make it) and
// freed when the thread ends. Null when OpenSSL has no memory for it.
EVP_CIPHER_CTX* ThreadContext() noexcept {
  thread_local std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)> context(
      nullptr, &EVP_CIPHER_CTX_free);
  if (!context) context.reset(EVP_CIPHER_CTX_new());
  return context.get();
}

void PutLe(std::uint8_t* at, std::uint64_t value, std::size_t bytes) noexcept {
  for (std::size_t i = 0; i < bytes; ++i) at[i] = static_cast<std::uint8_t>(value >> (8 * i));
}

struct Framing {
  std::uint8_t nonce[kNonceBytes];
  std::uint8_t aad[kAadBytes];
};

Framing FramingOf(std::uint32_t salt, const PageSealer::Binding& binding) noexcept {
  Framing framing;
  PutLe(framing.nonce, salt, 4);
  PutLe(framing.nonce + 4, binding.counter, 8);
  PutLe(framing.aad, binding.node_id, 8);
  PutLe(framing.aad + 8, binding.placement, 8);
  PutLe(framing.aad + 16, binding.counter, 8);
  return framing;
}

}  // namespace

PageSealer::Key PageSealer::NewKey() {
  Key key;
  std::size_t done = 0;
  while (done < key.size()) {
    const ssize_t n = ::getrandom(key.data() + done, key.size() - done, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw std::system_error(errno, std::generic_category(), "getrandom for the sealing key");
    }
    done += static_cast<std::size_t>(n);
  }
  return key;
}

PageSealer::~PageSealer() { OPENSSL_cleanse(key_.data(), key_.size()); }

bool PageSealer::Seal(ConstPageSpan in, PageSpan out, const Binding& binding,
                      Tag* tag) const noexcept {
  EVP_CIPHER_CTX* context = ThreadContext();
  const Framing framing = FramingOf(salt_, binding);
  const auto* from = reinterpret_cast<const unsigned char*>(in.data());
  auto* to = reinterpret_cast<unsigned char*>(out.data());
  int length = 0;
  int final_length = 0;
  const bool ok =
      context != nullptr &&
      EVP_EncryptInit_ex(context, EVP_aes_256_gcm(), nullptr, key_.data(), framing.nonce) == 1 &&
      EVP_EncryptUpdate(context, nullptr, &length, framing.aad, kAadBytes) == 1 &&
      EVP_EncryptUpdate(context, to, &length, from, static_cast<int>(kPageSize)) == 1 &&
      length == static_cast<int>(kPageSize) &&
      EVP_EncryptFinal_ex(context, to + length, &final_length) == 1 && final_length == 0 &&
      EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_GET_TAG, kTagBytes, tag->data()) == 1;
  if (!ok) std::memset(out.data(), 0, kPageSize);
  return ok;
}

int PageSealer::Open(ConstPageSpan in, PageSpan out, const Binding& binding,
                     const Tag& tag) const noexcept {
  EVP_CIPHER_CTX* context = ThreadContext();
  const Framing framing = FramingOf(salt_, binding);
  const auto* from = reinterpret_cast<const unsigned char*>(in.data());
  auto* to = reinterpret_cast<unsigned char*>(out.data());
  Tag expected = tag;  // the ctrl call takes a non-const pointer
  int length = 0;
  int final_length = 0;
  // Everything up to the tag check can fail only here (no memory); the check itself only
  // because the page is not what was sealed.
  const bool ready =
      context != nullptr &&
      EVP_DecryptInit_ex(context, EVP_aes_256_gcm(), nullptr, key_.data(), framing.nonce) == 1 &&
      EVP_DecryptUpdate(context, nullptr, &length, framing.aad, kAadBytes) == 1 &&
      EVP_DecryptUpdate(context, to, &length, from, static_cast<int>(kPageSize)) == 1 &&
      length == static_cast<int>(kPageSize) &&
      EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_SET_TAG, kTagBytes, expected.data()) == 1;
  const int rc = !ready ? -ENOMEM
                 : EVP_DecryptFinal_ex(context, to + length, &final_length) == 1 &&
                         final_length == 0
                     ? 0
                     : -EBADMSG;
  if (rc != 0) std::memset(out.data(), 0, kPageSize);
  return rc;
}

}  // namespace memlend
