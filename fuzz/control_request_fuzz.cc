// Fuzz target: the control socket's request parser, ParseControlRequest.
//
// An input is one request line (the daemon strips its newline). The parser must either
// return a request whose fields obey their documented bounds or throw
// std::invalid_argument with a one-line reason, free of control characters, that can go
// back in a JSON reply as the daemon sends it; any other exception, or a request out of
// bounds, is a bug.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string_view>
#include <variant>

#include <nlohmann/json.hpp>

#include "daemon/config.h"
#include "daemon/control_request.h"

namespace memlend::fuzz {
namespace {

[[noreturn]] void Fail(const char* what, const char* detail = "") {
  std::fprintf(stderr, "control_request_fuzz: %s%s%s\n", what, *detail ? ": " : "", detail);
  std::abort();
}

void Check(const ControlRequest& request) {
  if (const auto* attach = std::get_if<AttachRequest>(&request)) {
    if (!ValidDeviceName(attach->name)) Fail("attach accepted an invalid name");
    if (!CheckDeviceSize(attach->size_bytes).empty()) Fail("attach accepted a bad size");
    if (attach->frontend != "auto" && attach->frontend != "ublk" && attach->frontend != "nbd" &&
        attach->frontend != "fuse") {
      Fail("attach accepted an unknown frontend");
    }
    if (attach->queues > kMaxUblkQueues) Fail("attach accepted too many queues");
  } else if (const auto* detach = std::get_if<DetachRequest>(&request)) {
    if (!ValidDeviceName(detach->name)) Fail("detach accepted an invalid name");
  }
}

}  // namespace
}  // namespace memlend::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view line(reinterpret_cast<const char*>(data), size);
  try {
    memlend::fuzz::Check(memlend::ParseControlRequest(line));
  } catch (const std::invalid_argument& e) {
    // A refusal: its reason goes back to the client in a JSON reply, to be printed on one
    // line, so what came from the request is quoted with its control characters escaped.
    for (const char* c = e.what(); *c != '\0'; ++c) {
      const auto byte = static_cast<unsigned char>(*c);
      if (byte < 0x20 || byte == 0x7f) {
        memlend::fuzz::Fail("a refusal's reason holds a control character", e.what());
      }
    }
    try {
      (void)nlohmann::json{{"ok", false}, {"error", e.what()}}.dump();
    } catch (const std::exception& dump_error) {
      memlend::fuzz::Fail("the reason cannot go in a JSON reply", dump_error.what());
    }
  } catch (const std::exception& e) {
    memlend::fuzz::Fail("unexpected exception", e.what());
  }
  return 0;
}
