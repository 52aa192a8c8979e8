#include "common/log.h"

#include <fcntl.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <mutex>

#include "common/error.h"

namespace ftvm::log {
namespace {
std::atomic<int> g_level{static_cast<int>(Level::Info)};
std::atomic<int> g_fd{2};
std::mutex g_mu;
const char* name(Level l) {
  switch (l) {
    case Level::Debug: return "DEBUG";
    case Level::Info: return "INFO";
    case Level::Warn: return "WARN";
    case Level::Error: return "ERROR";
  }
  return "?";
}
}  // namespace

void set_level(Level l) { g_level = static_cast<int>(l); }
bool enabled(Level l) { return static_cast<int>(l) >= g_level.load(std::memory_order_relaxed); }

void set_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) throw SysError(errno, "open log file " + path, "check the directory exists and is writable");
  int old = g_fd.exchange(fd);
  if (old > 2) ::close(old);
}

void write(Level l, std::string_view component, std::string_view msg) {
  timeval tv{};
  gettimeofday(&tv, nullptr);
  tm t{};
  localtime_r(&tv.tv_sec, &t);
  std::string line = fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06} {} [{}] {}\n", t.tm_year + 1900,
                                 t.tm_mon + 1, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, tv.tv_usec, name(l),
                                 component, msg);
  std::lock_guard<std::mutex> g(g_mu);
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    ssize_t n = ::write(g_fd.load(), p, left);
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      return;  // logging never throws; a lost log line is preferable to a failed checkpoint
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace ftvm::log
