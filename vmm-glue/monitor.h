// Monitor: the QMP commands and events ftd exchanges with one QEMU, whoever owns the monitor.
//
// Two implementations: QmpClient (vmm-glue/qmp.h; ftd holds QEMU's QMP socket itself) and
// LibvirtMonitor (vmm-glue/libvirt.h; libvirt holds the monitor and ftd goes through
// virDomainQemuMonitorCommand[WithFiles] and libvirt's QEMU monitor events). Everything in ftd
// that drives QEMU (the primary session, output commit, disk mirror, the standby's twin) takes
// a Monitor&, so a libvirt domain and a plain QEMU are protected by the same code.
//
// Contract (both implementations):
//  * execute(cmd, args) runs one QMP command and returns its "return" member; a QMP error
//    reply throws QmpError (class and description as QEMU sent them); a broken channel
//    (EOF, timeout, malformed reply, libvirt connection lost) throws ftvm::Error and
//    connected() is false from then on.
//  * execute_with_fd() additionally hands `fd` to QEMU (SCM_RIGHTS / libvirt's fd passing)
//    for commands that take one (getfd, add-fd); the caller keeps its own descriptor.
//  * take_events() returns the QMP events received since the last call, oldest first
//    ({"event": NAME, "data": {...}, "timestamp": {...}}), at most a few thousand.
//  * set_idle_hook(): while a command waits for its reply, the hook runs on the calling thread
//    about every `period` (ftd keeps its replication heartbeats going while QEMU or libvirt
//    is slow to answer). The hook must not use the Monitor and must not throw.
//  * Not thread-safe: one thread per Monitor.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace ftvm::vmm {

class QmpError : public Error {
 public:
  QmpError(const std::string& cmd, const std::string& cls, const std::string& desc);
  const std::string& error_class() const { return cls_; }

 private:
  std::string cls_;
};

class Monitor {
 public:
  virtual ~Monitor() = default;
  virtual nlohmann::json execute(const std::string& cmd, const nlohmann::json& args = nullptr) = 0;
  virtual nlohmann::json execute_with_fd(const std::string& cmd, const nlohmann::json& args, int fd) = 0;
  virtual std::deque<nlohmann::json> take_events() = 0;
  virtual bool connected() const = 0;
  // For messages: "QMP socket /run/vm1.qmp" or "libvirt domain vm1 (qemu:///system)".
  virtual std::string describe() const = 0;
  // Changes whenever the monitor had to reconnect (libvirtd restarted). QEMU drops the fdsets
  // added through a monitor connection once no monitor is connected: a user of add-fd must
  // add its fds again when this changes.
  virtual uint64_t generation() const { return 0; }
  void set_idle_hook(std::function<void()> hook, std::chrono::milliseconds period) {
    idle_ = std::move(hook);
    idle_period_ = period;
  }

 protected:
  // Runs the idle hook; a throwing hook is a caller bug, contained here.
  void idle() noexcept {
    if (!idle_) return;
    try {
      idle_();
    } catch (...) {
    }
  }
  std::function<void()> idle_;
  std::chrono::milliseconds idle_period_{20};
};

}  // namespace ftvm::vmm
