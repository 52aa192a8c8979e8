#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fd.h"
#include "vmm-glue/qmp.h"

using namespace ftvm;
using namespace ftvm::vmm;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

const char* kGreeting =
    R"({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}})"
    "\r\n";

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/ftvm-test-qmp-XXXXXX";
    if (!::mkdtemp(tmpl)) throw SysError(errno, "mkdtemp");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

void send_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the client went away; the test's assertions tell the story
    off += static_cast<size_t>(n);
  }
}

// One line from the client ("" on EOF). Receives an SCM_RIGHTS descriptor into *passed_fd.
std::string read_line(int fd, int* passed_fd = nullptr) {
  std::string line;
  for (;;) {
    char c;
    iovec iov{&c, 1};
    alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int))];
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf;
    mh.msg_controllen = sizeof cbuf;
    ssize_t n = ::recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return "";
    for (cmsghdr* cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
      if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS && passed_fd)
        std::memcpy(passed_fd, CMSG_DATA(cm), sizeof(int));
    if (c == '\n') return line;
    line += c;
  }
}

json reply_to(const std::string& req_line, const json& ret) {
  json req = json::parse(req_line);
  json r = {{"return", ret}};
  if (req.contains("id")) r["id"] = req["id"];
  return r;
}

// Greeting + answer to qmp_capabilities, as QEMU does.
void handshake(int fd) {
  send_all(fd, kGreeting);
  std::string caps = read_line(fd);
  REQUIRE(json::parse(caps)["execute"] == "qmp_capabilities");
  send_all(fd, reply_to(caps, json::object()).dump() + "\r\n");
}

// A fake QMP server on a temp unix socket: accepts one connection and runs `script` on it in a
// thread. The script may block; the destructor shuts the connection down and joins.
class FakeQmp {
 public:
  explicit FakeQmp(std::function<void(int)> script, std::chrono::milliseconds listen_delay = 0ms)
      : path_(dir_.path + "/qmp.sock") {
    thread_ = std::thread([this, script, listen_delay] {
      std::this_thread::sleep_for(listen_delay);
      UniqueFd l(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
      sockaddr_un a{};
      a.sun_family = AF_UNIX;
      std::strcpy(a.sun_path, path_.c_str());
      if (::bind(l.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) < 0 || ::listen(l.get(), 1) < 0)
        return;
      UniqueFd c(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!c) return;
      conn_.store(c.get());
      script(c.get());
      // Keep the connection open until the test is done with it unless the script closed it.
      while (!stop_.load()) std::this_thread::sleep_for(5ms);
    });
  }
  ~FakeQmp() {
    stop_.store(true);
    int c = conn_.load();
    if (c >= 0) ::shutdown(c, SHUT_RDWR);
    thread_.join();
  }
  const std::string& path() const { return path_; }

 private:
  TempDir dir_;
  std::string path_;
  std::atomic<int> conn_{-1};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace

TEST_CASE("QMP: greeting, capabilities and a normal command", "[qmp]") {
  FakeQmp srv([](int fd) {
    handshake(fd);
    std::string req = read_line(fd);
    json r = json::parse(req);
    CHECK(r["execute"] == "query-status");
    CHECK_FALSE(r.contains("arguments"));
    send_all(fd, reply_to(req, {{"status", "running"}, {"running", true}}).dump() + "\r\n");
    req = read_line(fd);
    r = json::parse(req);
    CHECK(r["arguments"]["value"] == 5);
    send_all(fd, reply_to(req, json::object()).dump() + "\r\n");
  });
  auto c = QmpClient::connect(srv.path(), 2000ms);
  CHECK(c.peer_pid() == ::getpid());  // the fake server is this process
  CHECK(c.path() == srv.path());
  auto st = c.execute("query-status");
  CHECK(st["status"] == "running");
  CHECK(c.execute("set-thing", {{"value", 5}}) == json::object());
  CHECK(c.connected());
}

TEST_CASE("QMP: an event before the greeting is kept, not taken for the greeting", "[qmp]") {
  // Seen with a real QEMU that was resuming while the client connected.
  FakeQmp srv([](int fd) {
    send_all(fd, R"({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}})"
                 "\r\n");
    handshake(fd);
  });
  auto c = QmpClient::connect(srv.path(), 2000ms);
  auto ev = c.take_events();
  REQUIRE(ev.size() == 1);
  CHECK(ev[0]["event"] == "RESUME");
}

TEST_CASE("QMP: connect waits for the socket to appear", "[qmp]") {
  FakeQmp srv([](int fd) { handshake(fd); }, 300ms);
  auto c = QmpClient::connect(srv.path(), 3000ms);
  CHECK(c.connected());
}

TEST_CASE("QMP: connecting to nothing times out naming the socket", "[qmp]") {
  TempDir d;
  std::string p = d.path + "/none.sock";
  auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(QmpClient::connect(p, 200ms), Catch::Contains(p) && Catch::Contains("-qmp unix:"));
  CHECK(std::chrono::steady_clock::now() - t0 >= 200ms);
}

TEST_CASE("QMP: error reply throws QmpError with QEMU's class", "[qmp]") {
  FakeQmp srv([](int fd) {
    handshake(fd);
    std::string req = read_line(fd);
    json e = {{"error", {{"class", "CommandNotFound"}, {"desc", "The command nope has not been found"}}},
              {"id", json::parse(req)["id"]}};
    send_all(fd, e.dump() + "\r\n");
    // QEMU answers a request it cannot parse without an id.
    read_line(fd);
    send_all(fd, R"({"error": {"class": "GenericError", "desc": "JSON parse error"}})" "\r\n");
  });
  auto c = QmpClient::connect(srv.path(), 2000ms);
  try {
    c.execute("nope");
    FAIL("no exception");
  } catch (const QmpError& e) {
    CHECK(e.error_class() == "CommandNotFound");
    CHECK_THAT(e.what(), Catch::Contains("'nope'") && Catch::Contains("has not been found"));
  }
  // A QMP error leaves the connection usable.
  CHECK(c.connected());
  CHECK_THROWS_AS(c.execute("x"), QmpError);
}

TEST_CASE("QMP: events interleaved with replies are queued", "[qmp]") {
  FakeQmp srv([](int fd) {
    send_all(fd, kGreeting);
    std::string caps = read_line(fd);
    // An event before the capabilities reply (QEMU does not do this, but must be harmless).
    send_all(fd, R"({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"})" "\r\n");
    send_all(fd, reply_to(caps, json::object()).dump() + "\r\n");
    std::string req = read_line(fd);
    // Two events and the reply in a single write.
    send_all(fd, std::string(R"({"event": "STOP", "timestamp": {"seconds": 3, "microseconds": 4}})") + "\r\n" +
                     R"({"event": "MIGRATION", "data": {"status": "completed"}})" + "\r\n" +
                     reply_to(req, json::object()).dump() + "\r\n");
    std::this_thread::sleep_for(50ms);
    send_all(fd, R"({"event": "SHUTDOWN", "data": {"guest": true}})" "\r\n");
    std::this_thread::sleep_for(50ms);
    send_all(fd, R"({"event": "POWERDOWN"})" "\r\n");
  });
  auto c = QmpClient::connect(srv.path(), 2000ms);
  c.execute("stop");
  auto ev = c.take_events();
  REQUIRE(ev.size() == 3);
  CHECK(ev[0]["event"] == "RESUME");
  CHECK(ev[1]["event"] == "STOP");
  CHECK(ev[2]["data"]["status"] == "completed");
  CHECK(c.take_events().empty());
  // wait_event skips (and keeps) other events.
  auto pd = c.wait_event("POWERDOWN", 2000ms);
  REQUIRE(pd);
  auto rest = c.take_events();
  REQUIRE(rest.size() == 1);
  CHECK(rest[0]["event"] == "SHUTDOWN");
  CHECK_FALSE(c.wait_event("RESET", 50ms));
  CHECK(c.connected());
}

TEST_CASE("QMP: a reply split across writes and pretty-printed replies", "[qmp]") {
  FakeQmp srv([](int fd) {
    std::string g = kGreeting;
    for (char ch : g) {  // the greeting one byte per write
      send_all(fd, std::string(1, ch));
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    std::string caps = read_line(fd);
    send_all(fd, reply_to(caps, json::object()).dump() + "\r\n");
    std::string req = read_line(fd);
    std::string r = reply_to(req, {{"s", "a } tricky \" { string"}, {"list", {1, 2, 3}}}).dump(2);
    send_all(fd, r.substr(0, 7));
    std::this_thread::sleep_for(30ms);
    send_all(fd, r.substr(7, 20));
    std::this_thread::sleep_for(30ms);
    send_all(fd, r.substr(27) + "\n");
  });
  auto c = QmpClient::connect(srv.path(), 3000ms);
  auto r = c.execute("query-x");
  CHECK(r["s"] == "a } tricky \" { string");
  CHECK(r["list"].size() == 3);
}

TEST_CASE("QMP: non-QMP peers are rejected", "[qmp]") {
  auto reject = [](const std::string& banner, const std::string& expect) {
    FakeQmp srv([banner](int fd) { send_all(fd, banner); });
    CHECK_THROWS_WITH(QmpClient::connect(srv.path(), 1000ms),
                      Catch::Contains(srv.path()) && Catch::Contains(expect));
  };
  SECTION("garbage") { reject(std::string("\x01\x02garbage\n", 10), "not a QMP"); }
  SECTION("HTTP banner") { reject("HTTP/1.1 400 Bad Request\r\n\r\n", "HTTP/1.1"); }
  SECTION("SSH banner") { reject("SSH-2.0-OpenSSH_9.2\r\n", "not a QMP"); }
  SECTION("JSON that is not a greeting") { reject("{\"hello\": 1}\n", "not a QMP monitor"); }
  SECTION("silence") { reject("", "no answer"); }
  SECTION("malformed JSON greeting") { reject("{\"QMP\": [}\n", "malformed JSON"); }
}

TEST_CASE("QMP: truncated JSON then EOF", "[qmp]") {
  FakeQmp srv([](int fd) {
    handshake(fd);
    read_line(fd);
    send_all(fd, R"({"return": {"status": "runn)");
    ::shutdown(fd, SHUT_RDWR);
  });
  auto c = QmpClient::connect(srv.path(), 2000ms);
  CHECK_THROWS_WITH(c.execute("query-status"),
                    Catch::Contains("closed the connection in the middle of a message") &&
                        Catch::Contains("query-status"));
  CHECK_FALSE(c.connected());
  CHECK_THROWS_WITH(c.execute("query-status"), Catch::Contains("unusable"));
}

TEST_CASE("QMP: malformed JSON reply", "[qmp]") {
  FakeQmp srv([](int fd) {
    handshake(fd);
    read_line(fd);
    send_all(fd, "{\"return\": [1,}\r\n");
  });
  auto c = QmpClient::connect(srv.path(), 2000ms);
  CHECK_THROWS_WITH(c.execute("x"), Catch::Contains("malformed JSON"));
  CHECK_FALSE(c.connected());
}

TEST_CASE("QMP: no reply times out", "[qmp]") {
  FakeQmp srv([](int fd) {
    handshake(fd);
    read_line(fd);  // and never answer
  });
  auto c = QmpClient::connect(srv.path(), 2000ms);
  c.set_timeout(200ms);
  auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(c.execute("stop"), Catch::Contains("no answer from " + srv.path()));
  auto dt = std::chrono::steady_clock::now() - t0;
  CHECK(dt >= 200ms);
  CHECK(dt < 2000ms);
  CHECK_THROWS_WITH(c.execute("stop"), Catch::Contains("unusable"));
}

TEST_CASE("QMP: peer closes", "[qmp]") {
  FakeQmp srv([](int fd) {
    handshake(fd);
    ::shutdown(fd, SHUT_RDWR);
  });
  auto c = QmpClient::connect(srv.path(), 2000ms);
  std::this_thread::sleep_for(50ms);
  CHECK_THROWS_WITH(c.execute("cont"), Catch::Contains("cont") &&
                                           (Catch::Contains("closed the connection") ||
                                            Catch::Contains("QEMU exited")));
}

TEST_CASE("QMP: a reply with the wrong id is a protocol error", "[qmp]") {
  FakeQmp srv([](int fd) {
    handshake(fd);
    read_line(fd);
    send_all(fd, R"({"return": {}, "id": 999})" "\r\n");
  });
  auto c = QmpClient::connect(srv.path(), 2000ms);
  CHECK_THROWS_WITH(c.execute("x"), Catch::Contains("id 999"));
}

TEST_CASE("QMP: execute_with_fd passes the descriptor with the command", "[qmp]") {
  std::atomic<int> got{-1};
  FakeQmp srv([&got](int fd) {
    handshake(fd);
    int passed = -1;
    std::string req = read_line(fd, &passed);
    got.store(passed);
    CHECK(json::parse(req)["arguments"]["fdname"] == "x");
    send_all(fd, reply_to(req, json::object()).dump() + "\r\n");
  });
  TempDir d;
  std::string f = d.path + "/file";
  UniqueFd file(::open(f.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  REQUIRE(file);
  auto c = QmpClient::connect(srv.path(), 2000ms);
  c.execute_with_fd("getfd", {{"fdname", "x"}}, file.get());
  int passed = got.load();
  REQUIRE(passed >= 0);
  UniqueFd owned(passed);
  struct stat a {}, b {};
  REQUIRE(::fstat(file.get(), &a) == 0);
  REQUIRE(::fstat(passed, &b) == 0);
  CHECK(a.st_ino == b.st_ino);
  CHECK(a.st_dev == b.st_dev);
}

// ---- Against a real QEMU ------------------------------------------------------------------

namespace {

// QEMU child process, SIGKILLed and reaped by PID when the test ends, pass or fail.
class QemuChild {
 public:
  explicit QemuChild(std::vector<std::string> argv, const std::string& log) {
    pid_ = ::fork();
    if (pid_ < 0) throw SysError(errno, "fork for QEMU");
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      int lf = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      if (lf >= 0) {
        ::dup2(lf, 1);
        ::dup2(lf, 2);
      }
      int nul = ::open("/dev/null", O_RDONLY);
      if (nul >= 0) ::dup2(nul, 0);
      std::vector<char*> a;
      for (auto& s : argv) a.push_back(s.data());
      a.push_back(nullptr);
      ::execvp(a[0], a.data());
      ::_exit(127);
    }
  }
  ~QemuChild() {
    ::kill(pid_, SIGKILL);
    int st;
    while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
    }
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
};

bool have_qemu() { return std::system("command -v qemu-system-x86_64 >/dev/null 2>&1") == 0; }

}  // namespace

TEST_CASE("QMP against a real QEMU (-machine none)", "[qmp][qemu]") {
  if (!have_qemu()) {
    WARN("qemu-system-x86_64 not found: skipping the real-QEMU QMP test");
    return;
  }
  TempDir d;
  std::string sock = d.path + "/qmp.sock";
  QemuChild q({"qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-qmp",
               "unix:" + sock + ",server=on,wait=off"},
              d.path + "/qemu.log");
  auto c = QmpClient::connect(sock, 10000ms);
  CHECK(c.peer_pid() == q.pid());

  auto st = c.execute("query-status");
  CHECK(st["status"].is_string());
  auto v = c.execute("query-version");
  CHECK(v["qemu"]["major"].get<int>() >= 7);

  try {
    c.execute("no-such-command");
    FAIL("no exception");
  } catch (const QmpError& e) {
    CHECK(e.error_class() == "CommandNotFound");
  }

  TempDir fd_dir;
  std::string f = fd_dir.path + "/passed";
  UniqueFd file(::open(f.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  REQUIRE(file);
  CHECK(c.execute_with_fd("getfd", {{"fdname", "x"}}, file.get()) == json::object());
  CHECK(c.execute("closefd", {{"fdname", "x"}}) == json::object());
  CHECK_THROWS_AS(c.execute("closefd", {{"fdname", "x"}}), QmpError);  // already closed

  auto added = c.execute_with_fd("add-fd", {{"opaque", "ftvm-test"}}, file.get());
  REQUIRE(added.contains("fdset-id"));
  CHECK(added["fd"].get<int>() >= 0);
  auto sets = c.execute("query-fdsets");
  bool found = false;
  for (auto& s : sets)
    if (s["fdset-id"] == added["fdset-id"]) found = true;
  CHECK(found);
  // add-fd without a descriptor is QEMU's error, not a hang.
  CHECK_THROWS_AS(c.execute("add-fd"), QmpError);

  // An event from QEMU itself: stop emits STOP.
  c.execute("stop");
  bool stopped = c.wait_event("STOP", 2000ms).has_value();
  CHECK(stopped);

  // QEMU killed: the client reports it instead of hanging.
  ::kill(q.pid(), SIGKILL);
  CHECK_THROWS_AS(c.execute("query-status"), Error);
}
