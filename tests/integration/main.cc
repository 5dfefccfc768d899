// Entry point of integration_tests: doctest's runner, with SIGPIPE ignored so that a daemon
// closing a connection under a test turns into an EPIPE error the test can report instead of
// killing the test binary.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <signal.h>

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  doctest::Context context(argc, argv);
  return context.run();
}
