#include <catch2/catch.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "common/error.h"
#include "vmm-glue/qemu_cmdline.h"

using namespace ftvm::vmm;
using Argv = std::vector<std::string>;

namespace {

// The command line of experiments/linux-handoff/hl.py (a TCG Linux guest, memfd RAM).
Argv experiment_cmdline() {
  return {"qemu-system-x86_64", "-name", "src", "-accel", "tcg", "-machine",
          "q35,memory-backend=mem0", "-cpu", "qemu64", "-smp", "1", "-m", "256",
          "-object", "memory-backend-memfd,id=mem0,size=256M,share=on",
          "-kernel", "/w/vmlinux", "-initrd", "/w/initrd.cpio.gz", "-append",
          "console=ttyS0 panic=-1", "-nodefaults", "-display", "none",
          "-chardev", "socket,id=ser0,path=/w/run/src.serial.sock,server=on,wait=off",
          "-serial", "chardev:ser0",
          "-qmp", "unix:/w/run/src.qmp.sock,server=on,wait=off",
          "-netdev", "tap,id=n0,ifname=hl-tap0,script=no,downscript=no",
          "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:88:00:02"};
}

// What libvirt 9 runs for <memoryBacking><source type='memfd'/><access mode='shared'/>,
// <memballoon model='none'/>, a qcow2 disk and a bridged interface (JSON -object/-device/...).
Argv libvirt_cmdline() {
  return {
      "/usr/bin/qemu-system-x86_64",
      "-name", "guest=ft1,debug-threads=on",
      "-S",
      "-object",
      R"({"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-1-ft1/master-key.aes"})",
      "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
      "-accel", "tcg",
      "-cpu", "qemu64",
      "-m", "256",
      "-object",
      R"({"qom-type":"memory-backend-memfd","id":"pc.ram","share":true,"x-use-canonical-path-for-ramblock-id":false,"size":268435456})",
      "-overcommit", "mem-lock=off",
      "-smp", "1,sockets=1,cores=1,threads=1",
      "-uuid", "8a1d5c2e-3f3b-4f4e-9a7e-2b1c0d9e8f70",
      "-display", "none",
      "-no-user-config",
      "-nodefaults",
      "-chardev", "socket,id=charmonitor,fd=31,server=on,wait=off",
      "-mon", "chardev=charmonitor,id=monitor,mode=control",
      "-rtc", "base=utc",
      "-no-shutdown",
      "-boot", "strict=on",
      "-kernel", "/boot/vmlinuz-6.1.0-56-amd64",
      "-initrd", "/w/initrd2.gz",
      "-append", "console=ttyS0",
      "-device", R"({"driver":"piix3-usb-uhci","id":"usb","bus":"pci.0","addr":"0x1.0x2"})",
      "-blockdev",
      R"({"driver":"file","filename":"/var/lib/libvirt/images/ft1.qcow2","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"})",
      "-blockdev",
      R"({"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage"})",
      "-device",
      R"({"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x4","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1})",
      "-netdev", R"({"type":"tap","fd":"32","id":"hostnet0"})",
      "-device",
      R"({"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:12:34:56","bus":"pci.0","addr":"0x3"})",
      "-chardev", "file,id=charserial0,path=/var/log/libvirt/qemu/ft1-serial0.log",
      "-device", R"({"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0})",
      "-audiodev", R"({"id":"audio1","driver":"none"})",
      "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
      "-msg", "timestamp=on"};
}

bool any_contains(const std::vector<std::string>& v, const std::string& needle) {
  return std::any_of(v.begin(), v.end(),
                     [&](const std::string& s) { return s.find(needle) != std::string::npos; });
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (auto& x : v) s += x + "\n";
  return s;
}

// Value following the first occurrence of option `opt` (exact token), or "" if absent.
std::string value_of(const Argv& a, const std::string& opt, int nth = 0) {
  for (size_t i = 0; i + 1 < a.size(); ++i)
    if (a[i] == opt && nth-- == 0) return a[i + 1];
  return "";
}

size_t count_of(const Argv& a, const std::string& tok) {
  return static_cast<size_t>(std::count(a.begin(), a.end(), tok));
}

Argv with(Argv a, const Argv& extra) {
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

}  // namespace

TEST_CASE("keyval splitting honours ',,' escaping", "[qemu_cmdline]") {
  CHECK(split_keyval("a,,b,c=d") == Argv{"a,b", "c=d"});
  CHECK(split_keyval("path=/x,,y,,,z=1") == Argv{"path=/x,y,", "z=1"});
  CHECK(split_keyval("") == Argv{""});
  CHECK(join_keyval({"a,b", "c=d"}) == "a,,b,c=d");
  CHECK(join_keyval(split_keyval("x=1,,2,y")) == "x=1,,2,y");
  CHECK(qemu_bool("on"));
  CHECK(qemu_bool("yes"));
  CHECK(qemu_bool("true"));
  CHECK_FALSE(qemu_bool("off"));
  CHECK_FALSE(qemu_bool("false"));
}

TEST_CASE("experiment and libvirt command lines are protectable", "[qemu_cmdline]") {
  auto p = check_protectable(experiment_cmdline());
  INFO(joined(p));
  CHECK(p.empty());
  auto q = check_protectable(libvirt_cmdline());
  INFO(joined(q));
  CHECK(q.empty());
  // --option spelling and -M, and a single NUMA node holding the backend.
  Argv numa = {"qemu", "--M", "q35", "-object", "memory-backend-memfd,id=m,size=1G,share=yes",
               "-numa", "node,memdev=m", "--nodefaults"};
  auto r = check_protectable(numa);
  INFO(joined(r));
  CHECK(r.empty());
}

TEST_CASE("unprotectable RAM configurations are refused with the option named",
          "[qemu_cmdline]") {
  SECTION("anonymous -m RAM") {
    auto p = check_protectable({"qemu", "-m", "256", "-machine", "q35"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("anonymous RAM from -m"));
    CHECK_THAT(p[0], Catch::Contains("memory-backend-memfd,id=mem0"));
  }
  SECTION("share=off memfd") {
    auto p = check_protectable({"qemu", "-machine", "q35,memory-backend=mem0", "-object",
                                "memory-backend-memfd,id=mem0,size=256M"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("share=on is required"));
  }
  SECTION("memory-backend-file") {
    auto p = check_protectable({"qemu", "-machine", "q35,memory-backend=mem0", "-object",
                                "memory-backend-file,id=mem0,size=256M,mem-path=/dev/shm/x,share=on"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("must be memory-backend-memfd"));
  }
  SECTION("memory-backend-ram (JSON)") {
    auto p = check_protectable({"qemu", "-machine", "pc,memory-backend=pc.ram", "-object",
                                R"({"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456})"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("memory-backend-ram"));
  }
  SECTION("hugetlb") {
    auto p = check_protectable({"qemu", "-machine", "q35,memory-backend=mem0", "-object",
                                "memory-backend-memfd,id=mem0,size=1G,share=on,hugetlb=on"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("hugetlb=on is not supported"));
  }
  SECTION("-mem-path") {
    auto p = check_protectable({"qemu", "-m", "256", "-mem-path", "/dev/hugepages"});
    REQUIRE(p.size() == 2);
    CHECK_THAT(p[0], Catch::Contains("-mem-path /dev/hugepages"));
  }
  SECTION("memory-backend names a missing object") {
    auto p = check_protectable({"qemu", "-machine", "q35,memory-backend=nope"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("memory-backend=nope"));
  }
  SECTION("two NUMA nodes") {
    auto p = check_protectable(
        {"qemu", "-object", "memory-backend-memfd,id=m0,size=1G,share=on", "-object",
         "memory-backend-memfd,id=m1,size=1G,share=on", "-numa", "node,memdev=m0", "-numa",
         "node,memdev=m1"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("2 NUMA memory backends (m0, m1)"));
  }
  SECTION("extra backend for a pc-dimm") {
    auto p = check_protectable(with(experiment_cmdline(),
                                    {"-object", "memory-backend-memfd,id=d0,size=1G,share=on",
                                     "-device", "pc-dimm,id=dimm0,memdev=d0"}));
    REQUIRE(p.size() == 2);
    CHECK(any_contains(p, "-device pc-dimm (id dimm0) uses memory backend 'd0'"));
    CHECK(any_contains(p, "2 RAM backends (mem0, d0)"));
  }
}

TEST_CASE("devices whose RAM writes are not tracked are refused", "[qemu_cmdline]") {
  auto refused = [](const Argv& extra) { return check_protectable(with(experiment_cmdline(), extra)); };
  SECTION("any balloon") {
    auto p = refused({"-device", "virtio-balloon-pci,id=balloon0"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("-device virtio-balloon-pci (id balloon0)"));
    CHECK_THAT(p[0], Catch::Contains("memballoon model='none'"));
    auto q = refused({"-device", R"({"driver":"virtio-balloon-pci","id":"balloon0","free-page-reporting":true})"});
    REQUIRE(q.size() == 1);
  }
  SECTION("virtio-mem") {
    auto p = refused({"-device", "virtio-mem-pci,id=vm0,memdev=mem0"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("virtio-mem"));
  }
  SECTION("vhost-user netdev and its chardev") {
    auto p = refused({"-chardev", "socket,id=vu0,path=/run/vu.sock", "-netdev",
                      "vhost-user,id=n1,chardev=vu0"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("-netdev vhost-user (id n1) over -chardev vu0"));
  }
  SECTION("vhost-user device") {
    auto p = refused({"-device", "vhost-user-fs-pci,chardev=c,tag=t"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("vhost-user devices are not supported"));
  }
  SECTION("vhost=on tap, keyval and JSON") {
    auto p = refused({"-netdev", "tap,id=n1,ifname=t1,vhost=on"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("vhost-net is not supported"));
    CHECK_THAT(p[0], Catch::Contains("set vhost=off"));
    auto q = refused({"-netdev", R"({"type":"tap","fd":"32","vhost":true,"vhostfd":"34","id":"hostnet1"})"});
    REQUIRE(q.size() == 1);
    CHECK_THAT(q[0], Catch::Contains("-netdev tap (id hostnet1)"));
    CHECK(refused({"-netdev", "tap,id=n1,ifname=t1,vhost=off"}).empty());
  }
  SECTION("vhost-vsock and vfio") {
    CHECK(refused({"-device", "vhost-vsock-pci,guest-cid=3"}).size() == 1);
    CHECK(refused({"-device", "vfio-pci,host=0000:01:00.0"}).size() == 1);
  }
  SECTION("-incoming") {
    auto p = refused({"-incoming", "defer"});
    REQUIRE(p.size() == 1);
    CHECK_THAT(p[0], Catch::Contains("-incoming defer"));
  }
  SECTION("-daemonize is fine") { CHECK(refused({"-daemonize", "-pidfile", "/run/x.pid"}).empty()); }
}

TEST_CASE("malformed command lines are clear errors", "[qemu_cmdline]") {
  CHECK_THROWS_WITH(check_protectable({}), Catch::Contains("empty"));
  CHECK_THROWS_WITH(check_protectable({"qemu", "-m"}), Catch::Contains("-m has no value"));
  CHECK_THROWS_WITH(check_protectable({"qemu", "-object", "{\"qom-type\":"}),
                    Catch::Contains("malformed JSON"));
}

TEST_CASE("twin command line of the experiment guest", "[qemu_cmdline]") {
  TwinOptions t{"/var/run/ftvm/src", "/var/run/ftvm/src/twin.qmp", "-twin", {}, {}};
  auto primary = with(experiment_cmdline(), {"-daemonize", "-pidfile", "/w/run/src.pid", "-S",
                                             "-D", "/w/run/qemu.log", "-monitor", "stdio",
                                             "-serial", "unix:/w/run/s2.sock,server=on,wait=off"});
  auto a = make_twin_cmdline(primary, t);
  INFO(joined(a));
  CHECK(a[0] == "qemu-system-x86_64");
  CHECK(value_of(a, "-name") == "src-twin");
  CHECK(value_of(a, "-machine") == "q35,memory-backend=mem0");
  CHECK(value_of(a, "-object") == "memory-backend-memfd,id=mem0,size=256M,share=on");
  CHECK(value_of(a, "-chardev") == "socket,id=ser0,path=/var/run/ftvm/src/src.serial.sock,server=on,wait=off");
  CHECK(value_of(a, "-serial") == "chardev:ser0");
  CHECK(value_of(a, "-serial", 1) == "unix:/var/run/ftvm/src/s2.sock,server=on,wait=off");
  CHECK(value_of(a, "-D") == "/var/run/ftvm/src/qemu.log");
  CHECK(value_of(a, "-netdev") == "tap,id=n0,ifname=hl-tap0,script=no,downscript=no");
  CHECK(value_of(a, "-kernel") == "/w/vmlinux");
  CHECK(count_of(a, "-daemonize") == 0);
  CHECK(count_of(a, "-pidfile") == 0);
  CHECK(count_of(a, "-monitor") == 0);
  CHECK(count_of(a, "-S") == 1);
  CHECK(count_of(a, "-qmp") == 1);
  CHECK(value_of(a, "-qmp") == "unix:/var/run/ftvm/src/twin.qmp,server=on,wait=off");
  CHECK(value_of(a, "-incoming") == "defer");
  CHECK(value_of(a, "-global") == "migration.send-configuration=off");
  CHECK_FALSE(any_contains(a, "/w/run/"));
  // The twin of a protectable primary is itself protectable except for -incoming.
  auto p = check_protectable(a);
  REQUIRE(p.size() == 1);
  CHECK_THAT(p[0], Catch::Contains("-incoming defer"));
}

TEST_CASE("twin command line: monitors, chardevs, names, escaping", "[qemu_cmdline]") {
  TwinOptions t{"/run/t/", "/run/t/q,1.sock", "-ft", {}, {}};
  Argv primary = {"qemu", "--name", "vm1,process=qemu-vm1,debug-threads=on",
                  "-machine", "q35,memory-backend=m", "-object",
                  "memory-backend-memfd,id=m,size=1G,share=on",
                  "-chardev", "socket,id=mon0,path=/p/mon.sock,server=on,wait=off",
                  "-mon", "chardev=mon0,mode=control",
                  "-chardev", "socket,id=mon1,path=/p/hmp.sock,server=on,wait=off",
                  "-monitor", "chardev:mon1",
                  "-chardev", "file,id=log0,path=/p/a,,b.log,logfile=/p/chr.log",
                  "-chardev", "serial,id=host0,path=/dev/ttyS0",
                  "-chardev", "socket,id=c2,path=/q/a,,b.log,server=on",
                  "-device", "isa-serial,chardev=log0",
                  "-vnc", "unix:/p/vnc.sock",
                  "-trace", "enable=qmp*,file=/p/trace.out",
                  "-incoming", "tcp:0:4444", "-loadvm", "snap1", "-monitor", "none",
                  "disk.img"};
  auto a = make_twin_cmdline(primary, t);
  INFO(joined(a));
  CHECK(value_of(a, "--name") == "vm1-ft,process=qemu-vm1-ft,debug-threads=on");
  CHECK_FALSE(any_contains(a, "mon0"));
  CHECK_FALSE(any_contains(a, "mon1"));
  CHECK(count_of(a, "-monitor") == 1);
  CHECK(value_of(a, "-monitor") == "none");
  CHECK(value_of(a, "-chardev") == "file,id=log0,path=/run/t/a,,b.log,logfile=/run/t/chr.log");
  CHECK(value_of(a, "-chardev", 1) == "serial,id=host0,path=/dev/ttyS0");
  // Same basename as log0's path: made unique.
  CHECK(value_of(a, "-chardev", 2) == "socket,id=c2,path=/run/t/a,,b.log.1,server=on");
  CHECK(value_of(a, "-vnc") == "unix:/run/t/vnc.sock");
  CHECK(value_of(a, "-trace") == "enable=qmp*,file=/run/t/trace.out");
  CHECK(value_of(a, "-incoming") == "defer");
  CHECK(count_of(a, "-incoming") == 1);
  CHECK(count_of(a, "-loadvm") == 0);
  CHECK(count_of(a, "disk.img") == 1);
  CHECK(value_of(a, "-qmp") == "unix:/run/t/q,,1.sock,server=on,wait=off");
  CHECK_FALSE(any_contains(a, "/p/"));
}

TEST_CASE("twin command line of a libvirt domain", "[qemu_cmdline]") {
  TwinOptions t{"/run/ftvm/ft1", "/run/ftvm/ft1/qmp.sock", "-twin", {}, {}};
  // The tap is passed as fd=32 by libvirt: the twin cannot get it.
  CHECK_THROWS_WITH(make_twin_cmdline(libvirt_cmdline(), t),
                    Catch::Contains("fd=32") && Catch::Contains("through libvirt"));
  // With an ifname tap the rest translates; the monitor's fd=31 chardev goes with the monitor.
  auto argv = libvirt_cmdline();
  for (auto& s : argv)
    if (s == R"({"type":"tap","fd":"32","id":"hostnet0"})")
      s = R"({"type":"tap","ifname":"vnet3","script":"no","downscript":"no","id":"hostnet0"})";
  auto a = make_twin_cmdline(argv, t);
  INFO(joined(a));
  CHECK(value_of(a, "-name") == "guest=ft1-twin,debug-threads=on");
  CHECK_FALSE(any_contains(a, "charmonitor"));
  CHECK(count_of(a, "-mon") == 0);
  CHECK(value_of(a, "-chardev") == "file,id=charserial0,path=/run/ftvm/ft1/ft1-serial0.log");
  // JSON values are kept as JSON with the same content.
  CHECK(any_contains(a, R"("qom-type":"memory-backend-memfd")"));
  CHECK(any_contains(a, "/var/lib/libvirt/images/ft1.qcow2"));
  CHECK(count_of(a, "-S") == 1);
  auto p = check_protectable(a);
  REQUIRE(p.size() == 1);
  CHECK_THAT(p[0], Catch::Contains("-incoming"));
  // Descriptor sets are refused too.
  CHECK_THROWS_WITH(make_twin_cmdline(with(argv, {"-add-fd", "fd=40,set=1"}), t),
                    Catch::Contains("-add-fd"));
}

TEST_CASE("twin of a daemonized test-guest primary", "[qemu_cmdline]") {
  // The shape ftvm's e2e harness starts primaries with (-pidfile + -daemonize).
  Argv primary = {"qemu-system-x86_64", "-accel", "tcg", "-machine", "q35,memory-backend=mem0",
                  "-cpu", "max", "-smp", "1", "-m", "256M", "-object",
                  "memory-backend-memfd,id=mem0,size=256M,share=on", "-kernel", "/b/vmlinux",
                  "-initrd", "/b/initramfs.cpio.gz", "-append", "console=ttyS0 panic=-1 quiet",
                  "-nodefaults", "-display", "none", "-no-user-config", "-no-reboot",
                  "-chardev", "socket,id=ser0,path=/tmp/m1/g/serial.sock,server=on,wait=off",
                  "-serial", "chardev:ser0", "-qmp", "unix:/tmp/m1/g/qmp.sock,server=on,wait=off",
                  "-pidfile", "/tmp/m1/g/qemu.pid", "-daemonize"};
  CHECK(check_protectable(primary).empty());
  auto a = make_twin_cmdline(primary, {"/tmp/m1/s", "/tmp/m1/s/twin-qmp.sock", "", {}, {}});
  INFO(joined(a));
  Argv expect = {"qemu-system-x86_64", "-accel", "tcg", "-machine", "q35,memory-backend=mem0",
                 "-cpu", "max", "-smp", "1", "-m", "256M", "-object",
                 "memory-backend-memfd,id=mem0,size=256M,share=on", "-kernel", "/b/vmlinux",
                 "-initrd", "/b/initramfs.cpio.gz", "-append", "console=ttyS0 panic=-1 quiet",
                 "-nodefaults", "-display", "none", "-no-user-config", "-no-reboot",
                 "-chardev", "socket,id=ser0,path=/tmp/m1/s/serial.sock,server=on,wait=off",
                 "-serial", "chardev:ser0", "-S", "-incoming", "defer", "-global",
                 "migration.send-configuration=off", "-qmp",
                 "unix:/tmp/m1/s/twin-qmp.sock,server=on,wait=off"};
  CHECK(a == expect);
}

TEST_CASE("twin command line maps tap ifnames (--twin-tap-map)", "[qemu_cmdline]") {
  Argv primary = {"qemu-system-x86_64", "-machine", "q35,memory-backend=mem0", "-object",
                  "memory-backend-memfd,id=mem0,size=256M,share=on",
                  "-netdev", "tap,id=n0,ifname=ptap0,script=no,downscript=no",
                  "-device", "virtio-net-pci,netdev=n0",
                  "-netdev", R"({"type":"tap","id":"n1","ifname":"ptap1","script":"no"})",
                  "-netdev", "tap,id=n2,ifname=other,script=no",
                  "-netdev", "user,id=n3"};
  TwinOptions t{"/tmp/s", "/tmp/s/q.sock", "", {{"ptap0", "stap0"}, {"ptap1", "stap1"}}, {}};
  auto a = make_twin_cmdline(primary, t);
  INFO(joined(a));
  auto has = [&](const std::string& v) { return std::find(a.begin(), a.end(), v) != a.end(); };
  CHECK(has("tap,id=n0,ifname=stap0,script=no,downscript=no"));
  CHECK(has(R"({"id":"n1","ifname":"stap1","script":"no","type":"tap"})"));
  CHECK(has("tap,id=n2,ifname=other,script=no"));  // not mapped: kept
  CHECK(has("user,id=n3"));
}

TEST_CASE("twin command line gets the disk replicas", "[qemu_cmdline]") {
  Argv base = {"qemu-system-x86_64", "-machine", "q35,memory-backend=mem0", "-object",
               "memory-backend-memfd,id=mem0,size=256M,share=on"};
  TwinOptions t{"/tmp/s", "/tmp/s/q.sock", "", {}, {}};
  t.disk_files = {{"/img/a.qcow2", "/r/vm/0.img"}, {"/img/b,x.raw", "/r/vm/1.img"}};
  auto has = [](const Argv& a, const std::string& v) { return std::find(a.begin(), a.end(), v) != a.end(); };

  SECTION("-drive: file rewritten, format raw") {
    Argv p = base;
    p.insert(p.end(), {"-drive", "file=/img/a.qcow2,if=virtio,format=qcow2,cache=none", "-drive",
                       "file=/img/b,,x.raw,if=virtio", "-drive", "file=/iso/cd.iso,media=cdrom,readonly=on"});
    auto a = make_twin_cmdline(p, t);
    INFO(joined(a));
    CHECK(has(a, "file=/r/vm/0.img,if=virtio,format=raw,cache=none"));
    CHECK(has(a, "file=/r/vm/1.img,if=virtio,format=raw"));
    CHECK(has(a, "file=/iso/cd.iso,media=cdrom,readonly=on"));  // not replicated: kept
  }
  SECTION("-blockdev keyval: file node renamed, qcow2 node above it becomes raw") {
    Argv p = base;
    p.insert(p.end(), {"-blockdev", "driver=file,node-name=f0,filename=/img/a.qcow2,cache.direct=on", "-blockdev",
                       "driver=qcow2,node-name=q0,file=f0,l2-cache-size=1M,discard=unmap", "-blockdev",
                       "driver=raw,node-name=r1,file.driver=file,file.filename=/img/b,,x.raw", "-device",
                       "virtio-blk-pci,drive=q0"});
    auto a = make_twin_cmdline(p, t);
    INFO(joined(a));
    CHECK(has(a, "driver=file,node-name=f0,filename=/r/vm/0.img,cache.direct=on"));
    CHECK(has(a, "driver=raw,node-name=q0,file=f0,discard=unmap"));
    CHECK(has(a, "driver=raw,node-name=r1,file.driver=file,file.filename=/r/vm/1.img"));
  }
  SECTION("-blockdev JSON, nested and separate") {
    Argv p = base;
    p.insert(p.end(), {"-blockdev",
                       R"({"driver":"qcow2","node-name":"q0","file":{"driver":"file","filename":"/img/a.qcow2"},"cache":{"direct":true},"l2-cache-size":1048576})",
                       "-blockdev", R"({"driver":"file","node-name":"f1","filename":"/img/b,x.raw"})", "-blockdev",
                       R"({"driver":"raw","node-name":"r1","file":"f1"})"});
    auto a = make_twin_cmdline(p, t);
    INFO(joined(a));
    CHECK(has(a, R"({"cache":{"direct":true},"driver":"raw","file":{"driver":"file","filename":"/r/vm/0.img"},"node-name":"q0"})"));
    CHECK(has(a, R"({"driver":"file","filename":"/r/vm/1.img","node-name":"f1"})"));
    CHECK(has(a, R"({"driver":"raw","file":"f1","node-name":"r1"})"));
  }
  SECTION("a replicated disk missing from the command line is an error") {
    Argv p = base;
    p.insert(p.end(), {"-drive", "file=/img/a.qcow2,if=virtio"});
    CHECK_THROWS_WITH(make_twin_cmdline(p, t), Catch::Contains("/img/b,x.raw") && Catch::Contains("not named"));
  }
}
