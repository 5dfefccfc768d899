// Unit tests for ParseControlRequest: every command, and the refusals of malformed ones.
#include "daemon/control_request.h"

#include <doctest/doctest.h>

#include <stdexcept>
#include <string>

namespace memlend {
namespace {

std::string Refusal(const std::string& line) {
  try {
    ParseControlRequest(line);
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    CHECK(what.find('\n') == std::string::npos);
    return what;
  }
  FAIL("accepted: " << line);
  return "";
}

TEST_CASE("drain parses, with its deadline bounded") {
  CHECK(std::get<DrainRequest>(ParseControlRequest(R"({"command":"drain"})")).deadline_ms == 30000);
  CHECK(std::get<DrainRequest>(ParseControlRequest(R"({"command":"drain","deadline_ms":0})"))
            .deadline_ms == 0);
  CHECK(Refusal(R"({"command":"drain","deadline_ms":3600001})").find("from 0 to 3600000") !=
        std::string::npos);
  CHECK(Refusal(R"({"command":"drain","deadline_ms":-1})").find("deadline_ms") !=
        std::string::npos);
  CHECK(Refusal(R"({"command":"drain","deadline_ms":"5"})").find("deadline_ms") !=
        std::string::npos);
}

TEST_CASE("attach takes a redundancy of its own") {
  const auto attach = [](const char* line) { return std::get<AttachRequest>(ParseControlRequest(line)); };
  CHECK_FALSE(attach(R"({"command":"attach","name":"a","size_bytes":4096})").redundancy);
  CHECK(attach(R"({"command":"attach","name":"a","size_bytes":4096,"redundancy":"none"})")
            .redundancy == Redundancy{1, false});
  CHECK(attach(R"({"command":"attach","name":"a","size_bytes":4096,"redundancy":"replicas:3"})")
            .redundancy == Redundancy{3, false});
  CHECK(attach(R"({"command":"attach","name":"a","size_bytes":4096,"redundancy":"disk"})")
            .redundancy == Redundancy{0, true});
  CHECK(attach(R"({"command":"attach","name":"a","size_bytes":4096,
                   "redundancy":"replicas:2+disk"})")
            .redundancy == Redundancy{2, true});
  CHECK(Refusal(R"({"command":"attach","name":"a","size_bytes":4096,"redundancy":"replicas:4"})")
            .find("from 1 to 3") != std::string::npos);
  CHECK(Refusal(R"({"command":"attach","name":"a","size_bytes":4096,"redundancy":2})")
            .find("redundancy") != std::string::npos);
}

TEST_CASE("peer_add and peer_remove parse an address, and refuse a bad one") {
  const ControlRequest add =
      ParseControlRequest(R"({"command":"peer_add","address":"10.0.0.7:7700"})");
  REQUIRE(std::holds_alternative<PeerAddRequest>(add));
  CHECK(std::get<PeerAddRequest>(add).address.ToString() == "10.0.0.7:7700");
  const ControlRequest remove =
      ParseControlRequest(R"({"command":"peer_remove","address":"[::1]:7700"})");
  REQUIRE(std::holds_alternative<PeerRemoveRequest>(remove));
  CHECK(std::get<PeerRemoveRequest>(remove).address.ToString() == "[::1]:7700");
  CHECK(Refusal(R"({"command":"peer_add"})").find("\"address\" must be given") !=
        std::string::npos);
  CHECK(Refusal(R"({"command":"peer_add","address":7700})").find("address") != std::string::npos);
  CHECK(Refusal(R"({"command":"peer_remove","address":"no-port"})").find("no-port") !=
        std::string::npos);
  CHECK(Refusal(R"({"command":"peer_add","address":"host:99999"})").find("address") !=
        std::string::npos);
}

TEST_CASE("the four commands parse") {
  CHECK(std::holds_alternative<StatusRequest>(ParseControlRequest(R"({"command":"status"})")));
  CHECK(std::holds_alternative<PeersRequest>(ParseControlRequest(R"({"command":"peers"})")));
  const ControlRequest attach = ParseControlRequest(
      R"({"command":"attach","name":"swap0","size_bytes":4294967296,"frontend":"ublk","queues":4,"extra":1})");
  REQUIRE(std::holds_alternative<AttachRequest>(attach));
  CHECK(std::get<AttachRequest>(attach).name == "swap0");
  CHECK(std::get<AttachRequest>(attach).size_bytes == 4294967296ULL);
  CHECK(std::get<AttachRequest>(attach).frontend == "ublk");
  CHECK(std::get<AttachRequest>(attach).queues == 4);
  const ControlRequest defaults =
      ParseControlRequest(R"({"command":"attach","name":"a","size_bytes":4096})");
  CHECK(std::get<AttachRequest>(defaults).frontend == "auto");
  CHECK(std::get<AttachRequest>(defaults).queues == 0);
  const ControlRequest detach = ParseControlRequest(R"({"command":"detach","name":"a.b-c_d"})");
  CHECK(std::get<DetachRequest>(detach).name == "a.b-c_d");
}

TEST_CASE("malformed requests are refused with a reason") {
  CHECK(Refusal("") == "the request is not JSON");
  CHECK(Refusal("{\"command\":") == "the request is not JSON");
  CHECK(Refusal("[1,2]") == "the request must be a JSON object");
  CHECK(Refusal("{}").find("\"command\"") != std::string::npos);
  CHECK(Refusal(R"({"command":7})").find("\"command\"") != std::string::npos);
  CHECK(Refusal(R"({"command":"format\n"})") == "unknown command 'format\\x0a'");
  CHECK(Refusal(R"({"command":"attach","size_bytes":4096})").find("\"name\"") !=
        std::string::npos);
  CHECK(Refusal(R"({"command":"attach","name":"a/b","size_bytes":4096})").find("name") !=
        std::string::npos);
  CHECK(Refusal(R"({"command":"attach","name":"a","size_bytes":-4096})").find("size_bytes") !=
        std::string::npos);
  CHECK(Refusal(R"({"command":"attach","name":"a","size_bytes":4097})").find("4 KiB") !=
        std::string::npos);
  CHECK(Refusal(R"({"command":"attach","name":"a","size_bytes":35184372088832})")
            .find("16.0 TiB") != std::string::npos);
  CHECK(Refusal(R"({"command":"attach","name":"a","size_bytes":4096,"frontend":"scsi"})")
            .find("scsi") != std::string::npos);
  CHECK(Refusal(R"({"command":"attach","name":"a","size_bytes":4096,"queues":0})")
            .find("queues") != std::string::npos);
  CHECK(Refusal(R"({"command":"attach","name":"a","size_bytes":4096,"queues":257})")
            .find("queues") != std::string::npos);
  CHECK(Refusal(R"({"command":"detach"})").find("\"name\"") != std::string::npos);
}

}  // namespace
}  // namespace memlend
