#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <signal.h>

// Like ftd (tools/ftd/main.cc): a peer that vanished (a guard that fenced and exited, a closed
// socket) is an error return (EPIPE), never a process-killing SIGPIPE.
int main(int argc, char* argv[]) {
  ::signal(SIGPIPE, SIG_IGN);
  return Catch::Session().run(argc, argv);
}
