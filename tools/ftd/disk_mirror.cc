#include "tools/ftd/disk_mirror.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <optional>
#include <string_view>
#include <thread>

#include "common/error.h"
#include "common/log.h"
#include "tools/ftd/session.h"

namespace ftvm::ftd {

namespace cp = checkpoint;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::string_view kJobPrefix = "ftvm-mirror-";

std::string job_id(uint32_t disk) { return fmt::format("{}{}", kJobPrefix, disk); }

// The disk index of one of our mirror jobs ("ftvm-mirror-N"), or nullopt for any other job.
std::optional<uint32_t> job_disk(const std::string& job) {
  if (job.rfind(kJobPrefix, 0) != 0) return std::nullopt;
  try {
    return static_cast<uint32_t>(std::stoul(job.substr(kJobPrefix.size())));
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

}  // namespace

std::vector<DiskSpec> find_disks(vmm::Monitor& qmp, std::vector<std::string>& problems) {
  nlohmann::json blocks;
  try {
    blocks = qmp.execute("query-block");
  } catch (const vmm::QmpError& e) {
    if (e.error_class() == "CommandNotFound") return {};  // a VMM without a block layer
    throw;
  }
  std::vector<DiskSpec> out;
  if (!blocks.is_array()) fail("query-block returned {} (expected an array)", blocks.dump());
  for (const auto& b : blocks) {
    if (!b.contains("inserted") || !b["inserted"].is_object()) continue;  // empty drive
    const auto& ins = b["inserted"];
    if (ins.value("ro", false)) continue;  // read-only: the twin opens it as it is
    DiskSpec d;
    d.id = b.value("device", "");
    if (d.id.empty()) d.id = b.value("qdev", "");
    d.node = ins.value("node-name", "");
    if (d.id.empty()) d.id = d.node;
    d.source = ins.value("file", "");
    d.format = ins.value("drv", "");
    if (ins.contains("image") && ins["image"].is_object()) d.size = ins["image"].value("virtual-size", uint64_t{0});
    if (d.node.empty()) {
      problems.push_back(fmt::format("disk '{}': QEMU reports no block node name for it; give its -blockdev a "
                                     "node-name (or use -drive)", d.id));
      continue;
    }
    if (d.source.empty() || d.source.rfind("json:", 0) == 0 || d.source.find("://") != std::string::npos) {
      problems.push_back(fmt::format("disk '{}': image '{}' is not a plain file name; ftvm gives the twin a replica "
                                     "by rewriting the image path on the command line: use a local file", d.id,
                                     d.source));
      continue;
    }
    if (d.size == 0 || d.size % 512 != 0) {
      problems.push_back(fmt::format("disk '{}' ({}): size {} is not a positive multiple of 512 bytes", d.id,
                                     d.source, d.size));
      continue;
    }
    out.push_back(std::move(d));
  }
  if (out.size() > cp::kMaxDisks)
    problems.push_back(fmt::format("{} writable disks; ftvm replicates at most {}", out.size(), cp::kMaxDisks));
  return out;
}

// The NBD export of one disk: every write is queued for the standby; nothing is stored here.
class DiskMirror::Backend : public vmm::nbd::Backend {
 public:
  Backend(DiskMirror& m, uint32_t disk, uint64_t size) : m_(m), disk_(disk), size_(size) {}
  uint64_t size() const override { return size_; }
  // The mirror job never reads its target; there is no local copy to read from.
  int read(uint64_t offset, std::span<std::byte>) override {
    log::warn("disk", "{}: NBD read at {} on the write-only mirror target of disk {} refused (EIO)", m_.vm_, offset,
              disk_);
    return EIO;
  }
  int write(uint64_t offset, std::span<const std::byte> data, bool) override {
    return m_.enqueue(disk_, cp::DiskOp::Write, offset, data.size(), data);
  }
  int write_zeroes(uint64_t offset, uint64_t length, bool) override {
    return m_.enqueue(disk_, cp::DiskOp::Zero, offset, length, {});
  }
  int trim(uint64_t offset, uint64_t length) override {
    return m_.enqueue(disk_, cp::DiskOp::Trim, offset, length, {});
  }
  // Durability on the standby comes with the epoch's commit, not with a flush.
  int flush() override { return 0; }

 private:
  DiskMirror& m_;
  uint32_t disk_;
  uint64_t size_;
};

DiskMirror::DiskMirror(std::string vm, std::string run_dir, std::vector<DiskSpec> disks, pid_t qemu_pid,
                       uid_t qemu_uid, Options opts)
    : vm_(std::move(vm)), run_dir_(std::move(run_dir)), disks_(std::move(disks)), qemu_pid_(qemu_pid),
      qemu_uid_(qemu_uid), opts_(opts) {
  ready_.assign(disks_.size(), false);
  progress_.assign(disks_.size(), {0, 0});
}

DiskMirror::~DiskMirror() {
  std::vector<std::unique_ptr<vmm::nbd::Server>> servers;
  {
    std::lock_guard<std::mutex> g(mu_);
    discarding_ = true;
    servers.swap(servers_);
  }
  space_.notify_all();
}

std::vector<cp::DiskInfo> DiskMirror::infos() const {
  std::vector<cp::DiskInfo> v;
  for (const auto& d : disks_) v.push_back({d.id, d.source, d.size});
  return v;
}

int DiskMirror::enqueue(uint32_t disk, cp::DiskOp kind, uint64_t offset, uint64_t length,
                        std::span<const std::byte> data) {
  std::unique_lock<std::mutex> g(mu_);
  space_.wait(g, [&] { return discarding_ || overflow_ok_ || queued_bytes_ < opts_.queue_cap; });
  if (discarding_) return 0;  // not replicating (any more): the write is the source's alone
  Op op{tag_, disk, kind, offset, length, {}};
  op.data.assign(data.begin(), data.end());
  queued_bytes_ += data.size();
  peak_queued_bytes_ = std::max(peak_queued_bytes_, queued_bytes_);
  if (!ready_[disk]) sync_bytes_ += length;
  queue_.push_back(std::move(op));
  return 0;
}

void DiskMirror::set_failure(const std::string& why) {
  std::lock_guard<std::mutex> g(mu_);
  if (failure_.empty()) failure_ = why;
}

std::string DiskMirror::failure() const {
  std::lock_guard<std::mutex> g(mu_);
  if (!failure_.empty() || !running_) return failure_;
  for (size_t i = 0; i < servers_.size() && i < disks_.size(); i++) {
    auto s = servers_[i]->stats();
    // QEMU connects once. A lost connection fails the mirror writes in flight (QEMU's client
    // may reconnect at once, so a second connection counts as a loss too): the copy can no
    // longer be trusted to be complete.
    if (s.connections > 1 || (s.connections > 0 && !s.connected))
      return fmt::format("NBD connection from QEMU to the mirror target of disk '{}' was lost{}{}", disks_[i].id,
                         s.last_error.empty() ? "" : ": ", s.last_error);
  }
  return {};
}

void DiskMirror::start(vmm::Monitor& qmp, uint64_t epoch) {
  if (running_) fail("disk mirror of {} already running (bug)", vm_);
  {
    std::lock_guard<std::mutex> g(mu_);
    queue_.clear();
    queued_bytes_ = 0;
    tag_ = epoch;
    overflow_ok_ = false;
    discarding_ = false;
    failure_.clear();
    ready_.assign(disks_.size(), false);
    progress_.assign(disks_.size(), {0, 0});
    sync_bytes_ = 0;
    start_wall_ms_ = wall_ms();
    ready_after_ms_ = 0;
  }
  sent_.clear();
  running_ = true;
  try {
    const std::string dir = run_dir_ + "/nbd";
    std::filesystem::create_directories(dir);
    // QEMU may run as another user (libvirt-qemu): it must be able to reach the socket.
    check_sys(::chmod(dir.c_str(), 0711), "chmod " + dir);
    backends_.clear();
    std::vector<std::unique_ptr<vmm::nbd::Server>> servers;
    for (uint32_t i = 0; i < disks_.size(); i++) {
      backends_.push_back(std::make_unique<Backend>(*this, i, disks_[i].size));
      vmm::nbd::Options o;
      o.export_name = "ftvm";
      o.allowed_pid = qemu_pid_;
      o.socket_owner = qemu_uid_;
      const auto path = fmt::format("{}/{}.{}.sock", dir, vm_, i);
      servers.push_back(std::make_unique<vmm::nbd::Server>(path, *backends_.back(), o));
      servers.back()->start();
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      servers_ = std::move(servers);
    }
    for (uint32_t i = 0; i < disks_.size(); i++) {
      const auto nbd_node = fmt::format("ftvm-nbd-{}", i);
      try {  // left over by an earlier session that could not clean up
        qmp.execute("blockdev-del", {{"node-name", nbd_node}});
      } catch (const vmm::QmpError&) {
      }
      qmp.execute("blockdev-add", {{"driver", "nbd"},
                                   {"node-name", nbd_node},
                                   {"server", {{"type", "unix"}, {"path", servers_[i]->path()}}},
                                   {"export", "ftvm"}});
      qmp.execute("blockdev-mirror", {{"job-id", job_id(i)},
                                      {"device", disks_[i].node},
                                      {"target", nbd_node},
                                      {"sync", "full"},
                                      {"copy-mode", "write-blocking"},
                                      {"on-source-error", "report"},
                                      {"on-target-error", "report"}});
      log::info("disk", "{}: mirroring disk '{}' ({}, {} MiB) to the standby through {}", vm_, disks_[i].id,
                disks_[i].source, disks_[i].size >> 20, servers_[i]->path());
    }
  } catch (...) {
    stop(qmp);
    throw;
  }
}

void DiskMirror::stop(vmm::Monitor& qmp) noexcept {
  if (!running_) return;
  {
    std::lock_guard<std::mutex> g(mu_);
    discarding_ = true;
    queue_.clear();
    queued_bytes_ = 0;
  }
  space_.notify_all();
  for (uint32_t i = 0; i < disks_.size(); i++) {
    const auto job = job_id(i);
    try {
      qmp.execute("block-job-cancel", {{"device", job}, {"force", true}});
    } catch (const std::exception& e) {
      log::debug("disk", "{}: block-job-cancel {}: {}", vm_, job, e.what());
    }
  }
  // The jobs go away asynchronously; the NBD nodes can be deleted only after that.
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  for (;;) {
    bool any = false;
    try {
      for (const auto& j : qmp.execute("query-block-jobs"))
        if (job_disk(j.value("device", ""))) any = true;
    } catch (const std::exception& e) {
      log::warn("disk", "{}: query-block-jobs: {}", vm_, e.what());
      break;
    }
    if (!any || Clock::now() > deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (uint32_t i = 0; i < disks_.size(); i++) {
    try {
      qmp.execute("blockdev-del", {{"node-name", fmt::format("ftvm-nbd-{}", i)}});
    } catch (const std::exception& e) {
      log::debug("disk", "{}: blockdev-del ftvm-nbd-{}: {}", vm_, i, e.what());
    }
  }
  try {
    qmp.take_events();
  } catch (const std::exception&) {
  }
  std::vector<std::unique_ptr<vmm::nbd::Server>> servers;
  {
    std::lock_guard<std::mutex> g(mu_);
    servers.swap(servers_);
  }
  servers.clear();  // joins the server threads (they may still be inside enqueue)
  backends_.clear();
  running_ = false;
  log::info("disk", "{}: disk mirroring stopped", vm_);
}

void DiskMirror::mark_ready(uint32_t i) {
  std::lock_guard<std::mutex> g(mu_);
  if (ready_[i]) return;
  ready_[i] = true;
  if (std::all_of(ready_.begin(), ready_.end(), [](bool b) { return b; })) ready_after_ms_ = wall_ms() - start_wall_ms_;
  log::info("disk", "{}: disk '{}': initial copy complete, mirror ready", vm_, disks_[i].id);
}

void DiskMirror::on_events(const std::deque<nlohmann::json>& events) {
  for (const auto& e : events) {
    const std::string name = e.value("event", "");
    if (name.rfind("BLOCK_JOB_", 0) != 0 || !e.contains("data")) continue;
    const std::string dev = e["data"].value("device", "");
    const auto i = job_disk(dev);
    if (!i || *i >= disks_.size() || !running_) continue;
    if (name == "BLOCK_JOB_READY") {
      mark_ready(*i);
    } else if (name == "BLOCK_JOB_ERROR") {
      set_failure(fmt::format("disk mirror of '{}' failed: {} error on {} ({})", disks_[*i].id,
                              e["data"].value("operation", "?"), dev, e["data"].value("action", "?")));
    } else if (name == "BLOCK_JOB_COMPLETED" || name == "BLOCK_JOB_CANCELLED") {
      const std::string err = e["data"].value("error", "");
      set_failure(fmt::format("disk mirror of '{}' ended{}{}", disks_[*i].id, err.empty() ? "" : ": ", err));
    }
  }
}

void DiskMirror::poll_jobs(vmm::Monitor& qmp) {
  auto jobs = qmp.execute("query-block-jobs");
  std::vector<bool> seen(disks_.size(), false);
  for (const auto& j : jobs) {
    const auto i = job_disk(j.value("device", ""));
    if (!i || *i >= disks_.size()) continue;
    seen[*i] = true;
    {
      std::lock_guard<std::mutex> g(mu_);
      progress_[*i] = {j.value("offset", uint64_t{0}), j.value("len", uint64_t{0})};
    }
    if (j.value("ready", false)) mark_ready(*i);
  }
  for (uint32_t i = 0; i < disks_.size(); i++)
    if (running_ && !seen[i]) set_failure(fmt::format("disk mirror job {} of '{}' is gone", job_id(i), disks_[i].id));
}

bool DiskMirror::ready() const {
  std::lock_guard<std::mutex> g(mu_);
  return std::all_of(ready_.begin(), ready_.end(), [](bool b) { return b; });
}

void DiskMirror::cut(uint64_t epoch) {
  std::lock_guard<std::mutex> g(mu_);
  tag_ = epoch + 1;
}

void DiskMirror::allow_overflow(bool on) {
  {
    std::lock_guard<std::mutex> g(mu_);
    overflow_ok_ = on;
  }
  if (on) space_.notify_all();
}

size_t DiskMirror::forward(transport::Connection& conn, uint64_t session_id, uint64_t up_to) {
  size_t n = 0;
  for (;;) {
    Op op;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (queue_.empty() || queue_.front().epoch > up_to) break;
      op = std::move(queue_.front());
      queue_.pop_front();
      queued_bytes_ -= op.data.size();
    }
    space_.notify_all();
    auto& dg = sent_[op.epoch];
    auto send_one = [&](uint64_t off, uint64_t len, std::span<const std::byte> data) {
      dg.add(op.disk, op.kind, off, len, data);
      auto body = cp::encode_disk_write(session_id, op.epoch, op.disk, op.kind, off, len, data);
      conn.send_control(static_cast<uint16_t>(cp::MsgType::DiskWrite), body);
      n++;
    };
    if (op.kind == cp::DiskOp::Write) {
      for (uint64_t done = 0; done < op.length; done += cp::kMaxDiskWriteData) {
        const uint64_t len = std::min<uint64_t>(cp::kMaxDiskWriteData, op.length - done);
        send_one(op.offset + done, len, std::span<const std::byte>(op.data).subspan(done, len));
      }
    } else {
      send_one(op.offset, op.length, {});
    }
    std::lock_guard<std::mutex> g(mu_);
    forwarded_ops_++;
    forwarded_bytes_ += op.length;
  }
  return n;
}

std::pair<uint64_t, uint64_t> DiskMirror::epoch_summary(uint64_t epoch) {
  for (auto it = sent_.begin(); it != sent_.end() && it->first < epoch;) it = sent_.erase(it);
  auto it = sent_.find(epoch);
  if (it == sent_.end()) return {0, cp::DiskOpDigest().value()};
  return {it->second.count(), it->second.value()};
}

void DiskMirror::drop_connections() {
  for (auto& s : servers_) s->drop_client();
}

nlohmann::json DiskMirror::status() const {
  std::lock_guard<std::mutex> g(mu_);
  auto disks = nlohmann::json::array();
  for (size_t i = 0; i < disks_.size(); i++) {
    nlohmann::json d = {{"id", disks_[i].id},   {"source", disks_[i].source}, {"format", disks_[i].format},
                        {"size", disks_[i].size}, {"ready", ready_[i]},
                        {"copied", progress_[i].first}, {"total", progress_[i].second}};
    if (i < servers_.size()) {
      auto s = servers_[i]->stats();
      d["nbd"] = {{"connected", s.connected}, {"requests", s.requests}, {"errors", s.errors},
                  {"last_error", s.last_error}};
    }
    disks.push_back(d);
  }
  return {{"disks", disks},
          {"running", running_.load()},
          {"failure", failure_},
          {"queued_bytes", queued_bytes_},
          {"peak_queued_bytes", peak_queued_bytes_},
          {"forwarded_ops", forwarded_ops_},
          {"forwarded_bytes", forwarded_bytes_},
          {"initial_copy_bytes", sync_bytes_},
          {"initial_copy_ms", ready_after_ms_}};
}

}  // namespace ftvm::ftd
