#include "tools/ftd/output_buffer.h"

#include <fcntl.h>
#include <linux/sockios.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "common/error.h"
#include "common/log.h"
#include "vmm-glue/qemu_cmdline.h"

namespace ftvm::ftd {

namespace {

uint32_t get_be32(const std::byte* p) {
  return (uint32_t(std::to_integer<uint8_t>(p[0])) << 24) | (uint32_t(std::to_integer<uint8_t>(p[1])) << 16) |
         (uint32_t(std::to_integer<uint8_t>(p[2])) << 8) | uint32_t(std::to_integer<uint8_t>(p[3]));
}
void put_be32(std::vector<std::byte>& v, uint32_t x) {
  v.push_back(std::byte(x >> 24));
  v.push_back(std::byte(x >> 16));
  v.push_back(std::byte(x >> 8));
  v.push_back(std::byte(x));
}

uint64_t wall_us() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
}

UniqueFd listen_unix(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.size() >= sizeof(a.sun_path))
    fail("socket path {} is too long ({} bytes, at most {}); use a shorter --run-dir", path, path.size(),
         sizeof(a.sun_path) - 1);
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(check_sys(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket(AF_UNIX) for " + path));
  if (::unlink(path.c_str()) < 0 && errno != ENOENT) throw SysError(errno, "unlink stale socket " + path);
  check_sys(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), "bind " + path, "check --run-dir");
  check_sys(::listen(fd.get(), 1), "listen on " + path);
  return fd;
}

UniqueFd accept_within(int lfd, const std::string& path, std::chrono::milliseconds timeout) {
  pollfd p{lfd, POLLIN, 0};
  int r;
  do r = ::poll(&p, 1, static_cast<int>(timeout.count()));
  while (r < 0 && errno == EINTR);
  check_sys(r, "poll for QEMU's connection on " + path);
  if (r == 0) fail("QEMU did not connect to {} within {} ms", path, timeout.count());
  return UniqueFd(check_sys(::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK), "accept on " + path));
}

void qmp_quiet(vmm::Monitor& qmp, const std::string& cmd, const nlohmann::json& args) {
  try {
    qmp.execute(cmd, args);
  } catch (const std::exception&) {
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Parser

void RedirParser::feed(std::span<const std::byte> in, std::vector<RedirFrame>& out) {
  if (broken_) throw ProtocolError(what_ + ": stream already lost its framing");
  buf_.insert(buf_.end(), in.begin(), in.end());
  const size_t hdr = vnet_ ? 8 : 4;
  size_t off = 0;
  while (buf_.size() - off >= hdr) {
    const uint32_t len = get_be32(buf_.data() + off);
    const uint32_t vlen = vnet_ ? get_be32(buf_.data() + off + 4) : 0;
    if (len == 0 || vlen > kMaxVnetHdr || len > kMaxFrame + vlen || vlen > len) {
      broken_ = true;
      buf_.clear();
      throw ProtocolError(fmt::format("{}: bad frame header (length {}, vnet header length {}; allowed: 1..{} + "
                                      "vnet header, vnet header <= {} and <= length)",
                                      what_, len, vlen, kMaxFrame, kMaxVnetHdr));
    }
    if (buf_.size() - off - hdr < len) break;
    RedirFrame f;
    f.vnet_hdr_len = vlen;
    f.data.assign(buf_.begin() + static_cast<ptrdiff_t>(off + hdr),
                  buf_.begin() + static_cast<ptrdiff_t>(off + hdr + len));
    out.push_back(std::move(f));
    off += hdr + len;
  }
  buf_.erase(buf_.begin(), buf_.begin() + static_cast<ptrdiff_t>(off));
}

std::vector<std::byte> encode_redir_frame(const RedirFrame& f, bool vnet_hdr) {
  std::vector<std::byte> v;
  v.reserve(f.data.size() + 8);
  put_be32(v, static_cast<uint32_t>(f.data.size()));
  if (vnet_hdr) put_be32(v, f.vnet_hdr_len);
  v.insert(v.end(), f.data.begin(), f.data.end());
  return v;
}

// ---------------------------------------------------------------------------------------------
// OutputBuffer

OutputBuffer::OutputBuffer(std::string vm, OutputOptions opts) : vm_(std::move(vm)), opts_(opts) {
  wake_fd_.reset(check_sys(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), "eventfd for the output buffer"));
}

OutputBuffer::~OutputBuffer() {
  stop_ = true;
  wake();
  if (thread_.joinable()) thread_.join();
  for (auto& c : chans_) {
    if (!c->out_path.empty()) ::unlink(c->out_path.c_str());
    if (!c->in_path.empty()) ::unlink(c->in_path.c_str());
  }
}

void OutputBuffer::wake() {
  uint64_t one = 1;
  if (::write(wake_fd_.get(), &one, sizeof(one)) < 0 && errno != EAGAIN)
    log::warn("output", "{}: waking the output thread failed: {}", vm_, std::strerror(errno));
}

void OutputBuffer::add_channel(const std::string& netdev, UniqueFd divert, UniqueFd ret) {
  auto c = std::make_unique<Channel>(netdev, opts_.vnet_hdr);
  for (int fd : {divert.get(), ret.get()}) {
    int fl = check_sys(::fcntl(fd, F_GETFL), "fcntl(F_GETFL) on an output socket");
    check_sys(::fcntl(fd, F_SETFL, fl | O_NONBLOCK), "fcntl(O_NONBLOCK) on an output socket");
  }
  c->divert = std::move(divert);
  c->ret = std::move(ret);
  std::lock_guard<std::mutex> g(mu_);
  chans_.push_back(std::move(c));
}

void OutputBuffer::attach(vmm::Monitor& qmp, const std::string& netdev, const std::string& sock_dir) {
  const std::string cout_id = "ftvm-out-" + netdev, cin_id = "ftvm-in-" + netdev;
  const std::string fdiv = "ftvm-divert-" + netdev, fret = "ftvm-return-" + netdev;
  // Leftovers of an ftd that died: filters on dead sockets would drop the guest's output.
  for (const auto& id : {fdiv, fret}) qmp_quiet(qmp, "object-del", {{"id", id}});
  for (const auto& id : {cout_id, cin_id}) qmp_quiet(qmp, "chardev-remove", {{"id", id}});

  auto c = std::make_unique<Channel>(netdev, opts_.vnet_hdr);
  c->out_path = fmt::format("{}/{}.{}.out.sock", sock_dir, vm_, netdev);
  c->in_path = fmt::format("{}/{}.{}.in.sock", sock_dir, vm_, netdev);
  std::vector<std::pair<std::string, std::string>> added;  // (kind, id) for rollback
  auto chardev = [&](const std::string& id, const std::string& path) {
    qmp.execute("chardev-add",
                {{"id", id},
                 {"backend",
                  {{"type", "socket"},
                   {"data", {{"addr", {{"type", "unix"}, {"data", {{"path", path}}}}}, {"server", false}}}}}});
    added.emplace_back("chardev", id);
  };
  auto filter = [&](const std::string& id, const char* dir_key, const std::string& chr) {
    qmp.execute("object-add", {{"qom-type", "filter-redirector"},
                               {"id", id},
                               {"netdev", netdev},
                               {"queue", "rx"},
                               {dir_key, chr},
                               {"vnet_hdr_support", opts_.vnet_hdr}});
    added.emplace_back("object", id);
  };
  try {
    auto lout = listen_unix(c->out_path);
    auto lin = listen_unix(c->in_path);
    chardev(cout_id, c->out_path);
    c->divert = accept_within(lout.get(), c->out_path, std::chrono::milliseconds(5000));
    chardev(cin_id, c->in_path);
    c->ret = accept_within(lin.get(), c->in_path, std::chrono::milliseconds(5000));
    filter(fret, "indev", cin_id);   // first: see the traversal order in the header
    filter(fdiv, "outdev", cout_id);
  } catch (const std::exception& e) {
    for (auto it = added.rbegin(); it != added.rend(); ++it)
      qmp_quiet(qmp, it->first == "object" ? "object-del" : "chardev-remove", {{"id", it->second}});
    ::unlink(c->out_path.c_str());
    ::unlink(c->in_path.c_str());
    fail("VM '{}': could not intercept the output of netdev '{}' ({}); nothing was changed on it", vm_, netdev,
         e.what());
  }
  c->attached = true;
  log::info("output", "{}: netdev {}: guest output diverted to {} (filter {}), released frames return through {} "
                      "(filter {}), vnet_hdr_support {}",
            vm_, netdev, c->out_path, fdiv, c->in_path, fret, opts_.vnet_hdr ? "on" : "off");
  std::lock_guard<std::mutex> g(mu_);
  chans_.push_back(std::move(c));
}

void OutputBuffer::start() {
  thread_ = std::thread([this] { run(); });
}

void OutputBuffer::file_frame_locked(Channel& c, RedirFrame&& f) {
  frames_in_++;
  Held h{open_epoch_, encode_redir_frame(f, opts_.vnet_hdr), f.data.size()};
  if (!holding_) {
    c.out.insert(c.out.end(), h.wire.begin(), h.wire.end());
    frames_passed_++;
    return;
  }
  held_bytes_ += h.payload;
  held_frames_++;
  open_frames_.fetch_add(1, std::memory_order_relaxed);
  held_peak_ = std::max(held_peak_, held_bytes_);
  c.held.push_back(std::move(h));
  if (held_bytes_ >= opts_.cap_bytes && !cut_requested_.exchange(true)) {
    early_cuts_++;
    log::debug("output", "{}: {} bytes held (cap {}): asking for an early epoch cut", vm_, held_bytes_,
               opts_.cap_bytes);
  }
}

void OutputBuffer::read_locked(Channel& c) {
  if (!c.divert_open) return;
  std::byte buf[65536];
  for (;;) {
    ssize_t n = ::read(c.divert.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) {
      const size_t partial = c.parser.partial_bytes();
      c.error = n < 0 ? fmt::format("reading the divert socket failed: {}", std::strerror(errno))
                      : fmt::format("QEMU closed the divert socket{}", partial
                                        ? fmt::format(" in the middle of a frame ({} bytes of a truncated frame dropped)", partial)
                                        : "");
      log::error("output", "{}: netdev {}: {}; the guest keeps running, its output on this netdev is dropped by QEMU "
                           "until protection is disabled and enabled again; frames already held stay held",
                 vm_, c.netdev, c.error);
      c.divert_open = false;
      c.divert.reset();
      return;
    }
    std::vector<RedirFrame> frames;
    try {
      c.parser.feed(std::span<const std::byte>(buf, static_cast<size_t>(n)), frames);
    } catch (const std::exception& e) {
      for (auto& f : frames) file_frame_locked(c, std::move(f));
      c.error = e.what();
      log::error("output", "{}: netdev {}: {}; closing the divert stream (QEMU drops the guest's output on this "
                           "netdev from now on, nothing unreleased leaves); the guest keeps running",
                 vm_, c.netdev, e.what());
      c.divert_open = false;
      c.divert.reset();
      return;
    }
    for (auto& f : frames) file_frame_locked(c, std::move(f));
  }
}

void OutputBuffer::write_locked(Channel& c) {
  while (c.ret_open && c.out_off < c.out.size()) {
    ssize_t n = ::send(c.ret.get(), c.out.data() + c.out_off, c.out.size() - c.out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n < 0) {
      c.error = fmt::format("writing released frames to the return socket failed: {}", std::strerror(errno));
      log::error("output", "{}: netdev {}: {}; {} released bytes dropped", vm_, c.netdev, c.error,
                 c.out.size() - c.out_off);
      c.ret_open = false;
      c.ret.reset();
      break;
    }
    c.out_off += static_cast<size_t>(n);
  }
  if (c.out_off == c.out.size() || !c.ret_open) {
    c.out.clear();
    c.out_off = 0;
  }
}

void OutputBuffer::run() {
  while (!stop_) {
    std::vector<pollfd> pf;
    std::vector<std::pair<Channel*, bool>> who;  // (channel, is_divert)
    pf.push_back({wake_fd_.get(), POLLIN, 0});
    who.emplace_back(nullptr, false);
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& c : chans_) {
        if (c->divert_open) {
          pf.push_back({c->divert.get(), POLLIN, 0});
          who.emplace_back(c.get(), true);
        }
        if (c->ret_open && c->out_off < c->out.size()) {
          pf.push_back({c->ret.get(), POLLOUT, 0});
          who.emplace_back(c.get(), false);
        }
      }
    }
    int r = ::poll(pf.data(), pf.size(), 200);
    if (r < 0) {
      if (errno == EINTR) continue;
      log::error("output", "{}: poll failed: {}; output thread stops", vm_, std::strerror(errno));
      return;
    }
    if (pf[0].revents) {
      uint64_t v;
      if (::read(wake_fd_.get(), &v, sizeof(v)) < 0 && errno != EAGAIN)
        log::warn("output", "{}: reading the wake eventfd failed: {}", vm_, std::strerror(errno));
    }
    std::lock_guard<std::mutex> g(mu_);
    for (size_t i = 1; i < pf.size(); i++) {
      if (!pf[i].revents) continue;
      Channel& c = *who[i].first;
      if (who[i].second) read_locked(c);
    }
    for (auto& c : chans_) write_locked(*c);
  }
}

void OutputBuffer::seal(uint64_t epoch) {
  std::lock_guard<std::mutex> g(mu_);
  for (auto& c : chans_) read_locked(*c);  // everything the stopped guest sent is in the sockets
  if (!holding_) {
    log::info("output", "{}: holding the guest's output from the cut of epoch {} on", vm_, epoch);
    holding_ = true;
    mode_reason_.clear();
  }
  open_epoch_ = epoch + 1;
  open_frames_ = 0;
  for (auto& c : chans_) write_locked(*c);
}

void OutputBuffer::release(uint64_t epoch) {
  uint64_t frames = 0, bytes = 0;
  std::lock_guard<std::mutex> g(mu_);
  const uint64_t ts = wall_us();
  for (auto& c : chans_) {
    while (!c->held.empty() && c->held.front().epoch <= epoch) {
      auto& h = c->held.front();
      frames++;
      bytes += h.payload;
      held_bytes_ -= h.payload;
      held_frames_--;
      c->out.insert(c->out.end(), h.wire.begin(), h.wire.end());
      c->held.pop_front();
    }
  }
  frames_released_ += frames;
  bytes_released_ += bytes;
  last_released_epoch_ = std::max(last_released_epoch_, epoch);
  if (held_bytes_ < opts_.cap_bytes) cut_requested_ = false;
  if (frames)
    log::info("output", "{}: released epoch {}: {} frames, {} bytes (released total {} frames) wall_us {}", vm_, epoch,
              frames, bytes, frames_released_, ts);
  for (auto& c : chans_) write_locked(*c);
  wake();
}

void OutputBuffer::pass_through(const std::string& why) {
  std::lock_guard<std::mutex> g(mu_);
  for (auto& c : chans_) read_locked(*c);
  uint64_t frames = 0;
  for (auto& c : chans_) {
    for (auto& h : c->held) c->out.insert(c->out.end(), h.wire.begin(), h.wire.end());
    frames += c->held.size();
    c->held.clear();
  }
  if (holding_ || frames)
    log::info("output", "{}: output pass-through ({}); {} held frames released (wall_us {})", vm_, why, frames,
              wall_us());
  frames_released_ += frames;
  held_bytes_ = 0;
  held_frames_ = 0;
  holding_ = false;
  mode_reason_ = why;
  cut_requested_ = false;
  open_frames_ = 0;
  for (auto& c : chans_) write_locked(*c);
  wake();
}

bool OutputBuffer::holding() const {
  std::lock_guard<std::mutex> g(mu_);
  return holding_;
}

bool OutputBuffer::flush(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    bool done = true;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& c : chans_) {
        write_locked(*c);
        if (!c->ret_open) continue;
        int queued = 0;
        if (c->out_off < c->out.size()) done = false;
        else if (::ioctl(c->ret.get(), SIOCOUTQ, &queued) == 0 && queued > 0) done = false;
      }
    }
    if (done) return true;
    if (std::chrono::steady_clock::now() > deadline) {
      log::warn("output", "{}: released frames were not all consumed by QEMU within {} ms", vm_, timeout.count());
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

void OutputBuffer::detach(vmm::Monitor& qmp) {
  if (detached_) return;
  detached_ = true;
  try {
    pass_through("protection disabled");
  } catch (const std::exception& e) {
    log::error("output", "{}: {}", vm_, e.what());
  }
  std::vector<std::string> netdevs;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& c : chans_)
      if (c->attached) netdevs.push_back(c->netdev);
  }
  auto del = [&](const char* cmd, const std::string& id) {
    try {
      qmp.execute(cmd, {{"id", id}});
    } catch (const std::exception& e) {
      log::error("output", "{}: {} {} failed: {}", vm_, cmd, id, e.what());
    }
  };
  for (const auto& n : netdevs) del("object-del", "ftvm-divert-" + n);
  {
    // Frames QEMU diverted before the filter went away: forward them too.
    std::lock_guard<std::mutex> g(mu_);
    for (auto& c : chans_) read_locked(*c);
    for (auto& c : chans_) write_locked(*c);
  }
  flush(std::chrono::milliseconds(1000));
  for (const auto& n : netdevs) {
    del("object-del", "ftvm-return-" + n);
    del("chardev-remove", "ftvm-out-" + n);
    del("chardev-remove", "ftvm-in-" + n);
  }
  stop_ = true;
  wake();
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> g(mu_);
  for (auto& c : chans_) {
    c->attached = false;
    c->divert.reset();
    c->ret.reset();
    c->divert_open = c->ret_open = false;
  }
  log::info("output", "{}: output interception removed from {} netdev(s); the guest's frames take the plain path",
            vm_, netdevs.size());
}

nlohmann::json OutputBuffer::status() const {
  std::lock_guard<std::mutex> g(mu_);
  nlohmann::json nd = nlohmann::json::array();
  for (auto& c : chans_)
    nd.push_back({{"netdev", c->netdev},
                  {"held_frames", c->held.size()},
                  {"divert_open", c->divert_open},
                  {"return_open", c->ret_open},
                  {"error", c->error}});
  return {{"mode", holding_ ? "holding" : "pass-through"},
          {"mode_reason", mode_reason_},
          {"held_bytes", held_bytes_},
          {"held_bytes_peak", held_peak_},
          {"held_frames", held_frames_},
          {"cap_bytes", opts_.cap_bytes},
          {"frames_in", frames_in_},
          {"frames_released", frames_released_},
          {"bytes_released", bytes_released_},
          {"frames_passed_through", frames_passed_},
          {"last_released_epoch", last_released_epoch_},
          {"early_cuts", early_cuts_},
          {"output_cuts", output_cuts_.load()},
          {"netdevs", nd}};
}

std::vector<std::string> guest_netdevs(const std::vector<std::string>& argv) {
  std::vector<std::string> out;
  unsigned nic = 0;
  for (size_t i = 1; i + 1 < argv.size(); i++) {
    std::string o = argv[i];
    if (o.rfind("--", 0) == 0) o = o.substr(1);
    if (o == "-netdev") {
      const std::string& v = argv[i + 1];
      std::string id;
      if (!v.empty() && v[0] == '{') {
        try {
          auto j = nlohmann::json::parse(v);
          id = j.value("id", "");
        } catch (const nlohmann::json::exception&) {
        }
      } else {
        for (const auto& kv : vmm::split_keyval(v))
          if (kv.rfind("id=", 0) == 0) id = kv.substr(3);
      }
      if (!id.empty()) out.push_back(id);
      i++;
    } else if (o == "-nic") {
      const std::string& v = argv[i + 1];
      if (v != "none") out.push_back(fmt::format("__org.qemu.nic{}", nic));
      nic++;
      i++;
    }
  }
  return out;
}

}  // namespace ftvm::ftd
