// Configuration of the peer side: lending, borrowing, watermarks and node ids.
#include <doctest/doctest.h>

#include "daemon/config.h"

using namespace memlend;

namespace {

DaemonArgs Borrower() {
  DaemonArgs args;
  args.devices = {"d0:64M"};
  args.nbd = "unix:/tmp/memlend-config-test.sock";
  args.local_store = "16M";
  args.control = "/tmp/memlend-config-test-control.sock";
  return args;
}

DaemonArgs Lender() {
  DaemonArgs args;
  args.lend = "64M";
  args.listen = "127.0.0.1:7710";
  args.control = "/tmp/memlend-config-test-control.sock";
  return args;
}

std::string ErrorOf(const DaemonArgs& args) {
  DaemonConfig config;
  std::string error;
  CHECK_FALSE(BuildDaemonConfig(args, &config, &error));
  CHECK(error.find('\n') == std::string::npos);
  return error;
}

bool Has(const std::string& text, const char* part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("A lend-only daemon needs --listen and no device options") {
  DaemonConfig config;
  std::string error;
  REQUIRE(BuildDaemonConfig(Lender(), &config, &error));
  CHECK(config.devices.empty());
  CHECK(config.lend_bytes == 64u << 20);
  CHECK(config.listen.port == 7710);

  DaemonArgs no_listen = Lender();
  no_listen.listen.clear();
  CHECK(Has(ErrorOf(no_listen), "--listen"));

  DaemonArgs tiny = Lender();
  tiny.lend = "1M";
  CHECK(Has(ErrorOf(tiny), "--lend"));

  DaemonArgs with_nbd = Lender();
  with_nbd.nbd = "127.0.0.1:10809";
  CHECK(Has(ErrorOf(with_nbd), "--device"));

  DaemonArgs with_peer = Lender();
  with_peer.peers = {"127.0.0.1:7711"};
  CHECK(Has(ErrorOf(with_peer), "--peer"));

  DaemonArgs nothing;
  CHECK(Has(ErrorOf(nothing), "--device"));
  CHECK(Has(ErrorOf(nothing), "--lend"));

  DaemonArgs listen_only = Borrower();
  listen_only.listen = "127.0.0.1:7710";
  CHECK(Has(ErrorOf(listen_only), "--lend"));
}

TEST_CASE("A borrower takes peers and watermarks, and checks them") {
  DaemonArgs args = Borrower();
  args.peers = {"127.0.0.1:7710", "[::1]:7711"};
  args.high_watermark = "95%";
  args.low_watermark = "70";
  DaemonConfig config;
  std::string error;
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  REQUIRE(config.peers.size() == 2);
  CHECK(config.peers[1].host == "::1");
  CHECK(config.high_watermark == doctest::Approx(0.95));
  CHECK(config.low_watermark == doctest::Approx(0.70));
  CHECK(config.devices.size() == 1);

  DaemonArgs bad_peer = Borrower();
  bad_peer.peers = {"nowhere"};
  CHECK(Has(ErrorOf(bad_peer), "--peer"));

  for (const char* bad : {"0", "101", "9x", "", "-5", "50%%"}) {
    CAPTURE(bad);
    DaemonArgs high = Borrower();
    high.high_watermark = bad;
    CHECK(Has(ErrorOf(high), "--high-watermark"));
  }
  DaemonArgs inverted = Borrower();
  inverted.high_watermark = "60";
  inverted.low_watermark = "80";
  CHECK(Has(ErrorOf(inverted), "--low-watermark"));
}

TEST_CASE("Both halves together, and node ids") {
  DaemonArgs args = Borrower();
  args.lend = "32M";
  args.listen = "127.0.0.1:7712";
  args.peers = {"127.0.0.1:7713"};
  args.node_id = "00ff00ff00ff00ff";
  DaemonConfig config;
  std::string error;
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.node_id == 0x00ff00ff00ff00ffull);
  CHECK(config.lend_bytes == 32u << 20);
  CHECK(config.devices.size() == 1);

  DaemonConfig random_a;
  DaemonConfig random_b;
  REQUIRE(BuildDaemonConfig(Borrower(), &random_a, &error));
  REQUIRE(BuildDaemonConfig(Borrower(), &random_b, &error));
  CHECK(random_a.node_id != 0);
  CHECK(random_a.node_id != random_b.node_id);

  for (const char* bad : {"0", "xyz", "11112222333344445", "0x12"}) {
    CAPTURE(bad);
    DaemonArgs id = Borrower();
    id.node_id = bad;
    CHECK(Has(ErrorOf(id), "--node-id"));
  }
  CHECK(ParsePercent("100") == doctest::Approx(1.0));
  CHECK_FALSE(ParsePercent("1000").has_value());
}

TEST_CASE("--reclaim-below and --reclaim-pressure belong to a lender and are checked") {
  DaemonArgs args = Lender();
  args.reclaim_below = "512M";
  args.reclaim_pressure = "12.5";
  DaemonConfig config;
  std::string error;
  REQUIRE(BuildDaemonConfig(args, &config, &error));
  CHECK(config.reclaim_below_bytes == 512u << 20);
  CHECK(config.reclaim_pressure == 12.5);
  DaemonConfig plain;
  REQUIRE(BuildDaemonConfig(Lender(), &plain, &error));
  CHECK(plain.reclaim_pressure == 0);  // off unless given

  for (const char* bad : {"x", "-1", "101", "5%", "nan", "1e400", " 5", "0x1A", "1e1", "1.2.3"}) {
    CAPTURE(bad);
    DaemonArgs wrong = Lender();
    wrong.reclaim_pressure = bad;
    const std::string message = ErrorOf(wrong);
    CHECK(Has(message, "--reclaim-pressure"));
    CHECK(Has(message, "percentage"));
  }
  DaemonArgs borrower = Borrower();
  borrower.reclaim_pressure = "10";
  const std::string message = ErrorOf(borrower);
  CHECK(Has(message, "--reclaim-pressure"));
  CHECK(Has(message, "--lend"));
}
