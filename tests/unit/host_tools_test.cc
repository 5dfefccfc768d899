// The frontends' process and block-device helpers (src/frontend/host_tools.h).
#include "frontend/host_tools.h"

#include <doctest/doctest.h>
#include <sys/wait.h>

#include <cerrno>
#include <string>

#include "temp_dir.h"

namespace memlend::frontend {
namespace {

TEST_CASE("FindProgram finds programs in PATH and nothing for unknown names") {
  CHECK(FindProgram("sh").find("/sh") != std::string::npos);
  CHECK(FindProgram("no-such-program-memlend").empty());
}

TEST_CASE("RunProcess reports the exit status; WaitProcess times out on a running child") {
  CHECK(RunProcess({"true"}, 5000));
  CHECK_FALSE(RunProcess({"false"}, 5000));
  CHECK_FALSE(RunProcess({"no-such-program-memlend"}, 5000));
  CHECK_FALSE(RunProcess({"sleep", "10"}, 100));  // killed at the timeout

  const pid_t pid = SpawnProcess({"sh", "-c", "exit 3"});
  const int status = WaitProcess(pid, 5000);
  REQUIRE(status >= 0);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 3);

  const pid_t sleeper = SpawnProcess({"sleep", "10"});
  CHECK(WaitProcess(sleeper, 50) == -ETIMEDOUT);
  CHECK(RunProcess({"kill", std::to_string(sleeper)}, 5000));
  CHECK(WaitProcess(sleeper, 5000) >= 0);
}

TEST_CASE("SpawnProcess names a program that is not installed") {
  CHECK_THROWS_WITH_AS(SpawnProcess({"no-such-program-memlend"}),
                       doctest::Contains("no-such-program-memlend is not installed"),
                       std::runtime_error);
}

TEST_CASE("CheckNotHeld: a plain file is not held; a missing one says so") {
  testing::TempDir dir;
  const std::string file = dir.File("plain");
  REQUIRE(RunProcess({"touch", file}, 5000));
  CHECK(CheckNotHeld(file) == 0);
  CHECK(CheckNotHeld(dir.File("missing")) == -ENOENT);
  CHECK(PathExists(file));
  CHECK_FALSE(PathExists(dir.File("missing")));
}

TEST_CASE("WaitFor returns as soon as the condition holds, or false at the timeout") {
  int calls = 0;
  CHECK(WaitFor(1000, [&] { return ++calls == 3; }));
  CHECK(calls == 3);
  CHECK_FALSE(WaitFor(30, [] { return false; }));
}

}  // namespace
}  // namespace memlend::frontend
