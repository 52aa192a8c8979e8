// The failover=manual wait record (tools/ftd/standby_persist.h): what a restarted standby ftd
// reads to adopt a twin waiting for `ftctl failover --force`. A record is adopted only when it
// is complete and its device state is the one recorded; anything else is discarded.
#include <catch2/catch.hpp>

#include <stdlib.h>

#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tools/ftd/standby_persist.h"

namespace {

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/ftvm-persist-XXXXXX";
    REQUIRE(::mkdtemp(t) != nullptr);
    path = t;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

ftvm::ftd::ManualWaitRecord sample() {
  ftvm::ftd::ManualWaitRecord r;
  r.vm = "vm1";
  r.session_id = 0x1234abcd;
  r.twin_pid = 4242;
  r.vm_dir = "/run/ftvm/vms/vm1";
  r.qmp_socket = "/run/ftvm/vms/vm1/twin-qmp.sock";
  r.ram_size = 256u << 20;
  r.epoch = 77;
  r.ram_digest = 0xfeedfacecafebeefull;
  r.reported_dead = true;
  r.peer = "10.0.0.1:40000";
  r.peer_host = "10.0.0.1";
  r.key_id = "ab12";
  r.origin = "hostA@10.0.0.1:7410";
  r.arbiter = "fence-command";
  r.last_heard_wall_ms = 1.5e12;
  r.lost_wall_ms = 1.5e12 + 10;
  r.reason = "primary reports its QEMU died";
  r.history_in = R"([{"event":"protected"}])";
  r.local_events = nlohmann::json::array({{{"event", "primary-lost"}}});
  r.disk_paths = {"/var/lib/ftvm/disks/vm1/0.img"};
  r.disk_dir = "/var/lib/ftvm/disks/vm1";
  r.reprotect_port = 7410;
  return r;
}

std::vector<std::byte> devstate(size_t n) {
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; i++) v[i] = static_cast<std::byte>(i * 31 + 7);
  return v;
}

}  // namespace

TEST_CASE("manual-wait record: saved and loaded back with its device state", "[reprotect][persist]") {
  TempDir d;
  const auto ds = devstate(100000);
  ftvm::ftd::save_manual_wait(d.path, sample(), ds);
  auto rs = ftvm::ftd::load_manual_waits(d.path);
  REQUIRE(rs.size() == 1);
  const auto& r = rs[0];
  const auto s = sample();
  CHECK(r.vm == s.vm);
  CHECK(r.session_id == s.session_id);
  CHECK(r.twin_pid == s.twin_pid);
  CHECK(r.epoch == s.epoch);
  CHECK(r.ram_digest == s.ram_digest);
  CHECK(r.reported_dead);
  CHECK(r.peer_host == s.peer_host);
  CHECK(r.key_id == s.key_id);
  CHECK(r.arbiter == s.arbiter);
  CHECK(r.last_heard_wall_ms == s.last_heard_wall_ms);
  CHECK(r.history_in == s.history_in);
  CHECK(r.local_events == s.local_events);
  CHECK(r.disk_paths == s.disk_paths);
  CHECK(r.reprotect_port == s.reprotect_port);
  CHECK(r.devstate_size == ds.size());
  // The device state file holds exactly the bytes given.
  std::ifstream f(ftvm::ftd::manual_wait_dir(d.path) + "/vm1.devstate", std::ios::binary);
  std::vector<char> back((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  REQUIRE(back.size() == ds.size());
  CHECK(std::memcmp(back.data(), ds.data(), ds.size()) == 0);

  ftvm::ftd::forget_manual_wait(d.path, "vm1");
  CHECK(ftvm::ftd::load_manual_waits(d.path).empty());
  CHECK(!std::filesystem::exists(ftvm::ftd::manual_wait_dir(d.path) + "/vm1.devstate"));
}

TEST_CASE("manual-wait record: a changed device state, a truncated record or no committed epoch is discarded",
          "[reprotect][persist]") {
  TempDir d;
  const auto dir = ftvm::ftd::manual_wait_dir(d.path);
  SECTION("device state altered after it was recorded") {
    ftvm::ftd::save_manual_wait(d.path, sample(), devstate(4096));
    {
      std::fstream f(dir + "/vm1.devstate", std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(100);
      f.put('X');
    }
    CHECK(ftvm::ftd::load_manual_waits(d.path).empty());
  }
  SECTION("device state missing") {
    ftvm::ftd::save_manual_wait(d.path, sample(), devstate(4096));
    std::filesystem::remove(dir + "/vm1.devstate");
    CHECK(ftvm::ftd::load_manual_waits(d.path).empty());
  }
  SECTION("record truncated") {
    ftvm::ftd::save_manual_wait(d.path, sample(), devstate(4096));
    std::filesystem::resize_file(dir + "/vm1.json", 40);
    CHECK(ftvm::ftd::load_manual_waits(d.path).empty());
  }
  SECTION("no committed epoch") {
    auto r = sample();
    r.epoch = 0;
    ftvm::ftd::save_manual_wait(d.path, r, devstate(4096));
    CHECK(ftvm::ftd::load_manual_waits(d.path).empty());
  }
  // A discarded record is removed with its device state: the next start does not see it again.
  CHECK(!std::filesystem::exists(dir + "/vm1.json"));
  CHECK(!std::filesystem::exists(dir + "/vm1.devstate"));
}
