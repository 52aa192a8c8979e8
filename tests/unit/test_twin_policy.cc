// The standby's policy on what a twin may run (issue 12): the binary, the options and the
// files of the twin's command line, and the libvirt domain XML of a libvirt twin.
#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "common/error.h"
#include "vmm-glue/libvirt_xml.h"
#include "tools/ftd/standby.h"
#include "vmm-glue/qemu_cmdline.h"

using namespace ftvm::vmm;
using Argv = std::vector<std::string>;

namespace {

constexpr const char* kQemu = "/usr/bin/qemu-system-x86_64";

// A scratch tree: RUN (the twin's run dir), DISKS (its replica dir), IMAGES (--allow-path).
struct Tree {
  std::string root;
  Tree() {
    char t[] = "/tmp/ftvm-policy-XXXXXX";
    root = ::mkdtemp(t);
    for (const char* d : {"/run", "/disks", "/images", "/other"}) std::filesystem::create_directories(root + d);
  }
  ~Tree() {
    std::error_code ec;
    std::filesystem::remove_all(root, ec);
  }
  std::string run() const { return root + "/run"; }
  std::string disks() const { return root + "/disks"; }
  std::string images() const { return root + "/images"; }
  TwinPolicy policy() const { return TwinPolicy{{kQemu}, run(), disks(), {images()}}; }
};

// What tests/guest/boot-guest.sh runs (plus a replicated disk and a tap), made into a twin.
Argv guest(const Tree& t) {
  return {kQemu, "-accel", "tcg", "-machine", "q35,memory-backend=mem0", "-cpu", "max", "-smp", "2", "-m", "256M",
          "-object", "memory-backend-memfd,id=mem0,size=256M,share=on", "-kernel", t.images() + "/vmlinux",
          "-initrd", t.images() + "/initramfs.cpio.gz", "-append", "console=ttyS0 panic=-1 quiet", "-nodefaults",
          "-display", "none", "-no-user-config", "-no-reboot", "-chardev",
          "socket,id=ser0,path=/primary/run/serial.sock,server=on,wait=off", "-serial", "chardev:ser0", "-qmp",
          "unix:/primary/run/qmp.sock,server=on,wait=off", "-pidfile", "/primary/run/qemu.pid", "-daemonize",
          "-drive", "file=/primary/disk.img,if=virtio,format=raw,cache=writeback", "-netdev",
          "tap,id=n0,ifname=ptap0,script=no,downscript=no", "-device", "virtio-net-pci,netdev=n0,romfile=",
          "-no-shutdown"};
}

Argv twin_of(const Tree& t, Argv a) {
  TwinOptions o;
  o.run_dir = t.run();
  o.qmp_socket = t.run() + "/twin-qmp.sock";
  o.disk_files["/primary/disk.img"] = t.disks() + "/0.img";
  return make_twin_cmdline(a, o);
}

bool mentions(const std::vector<std::string>& problems, const std::string& word) {
  for (const auto& p : problems)
    if (p.find(word) != std::string::npos) return true;
  return false;
}

}  // namespace

TEST_CASE("the twin's binary is the standby's own, picked by basename", "[security]") {
  const std::vector<std::string> allowed = {kQemu, "/opt/ftvm/bin/synthvm"};
  CHECK(pick_qemu_binary("qemu-system-x86_64", allowed) == kQemu);
  CHECK(pick_qemu_binary("/primary/weird/place/qemu-system-x86_64", allowed) == kQemu);
  CHECK(pick_qemu_binary("/x/synthvm", allowed) == "/opt/ftvm/bin/synthvm");
  CHECK_THROWS_WITH(pick_qemu_binary("/bin/sh", allowed), Catch::Contains("'/bin/sh'") && Catch::Contains("--qemu-binary"));
  CHECK_THROWS_AS(pick_qemu_binary("qemu-system-aarch64", allowed), ftvm::Error);
  CHECK_THROWS_AS(pick_qemu_binary("qemu-system-x86_64", {}), ftvm::Error);
}

TEST_CASE("the test guests' twin command lines pass the policy", "[security]") {
  Tree t;
  auto argv = twin_of(t, guest(t));
  auto problems = check_twin_cmdline(argv, t.policy());
  INFO(fmt::format("{}", fmt::join(problems, "\n")));
  CHECK(problems.empty());
  // synthvm (tests/synthetic-vmm) as the allowed binary.
  Argv syn = {"/b/synthvm", "-name", "guest=g", "-machine", "q35,memory-backend=mem0", "-m", "64", "-object",
              "memory-backend-memfd,id=mem0,size=64M,share=on", "-nodefaults", "-display", "none", "-chardev",
              "socket,id=ser0,path=/p/serial.sock,server=on,wait=off", "-serial", "chardev:ser0", "-qmp",
              "unix:/p/qmp.sock,server=on,wait=off", "-append", "synth_rate_kib_s=2048 synth_tick_ms=100"};
  TwinOptions o;
  o.run_dir = t.run();
  o.qmp_socket = t.run() + "/twin-qmp.sock";
  auto p = t.policy();
  p.qemu_binaries = {"/b/synthvm"};
  CHECK(check_twin_cmdline(make_twin_cmdline(syn, o), p).empty());
}

TEST_CASE("hostile twin command lines are refused, each problem named", "[security]") {
  Tree t;
  auto p = t.policy();
  auto refused = [&](Argv extra, const std::string& word) {
    Argv a = guest(t);
    a.insert(a.end(), extra.begin(), extra.end());
    auto problems = check_twin_cmdline(twin_of(t, a), p);
    INFO(fmt::format("extra {} -> {}", fmt::join(extra, " "), fmt::join(problems, " | ")));
    CHECK(mentions(problems, word));
  };
  refused({"-plugin", "/tmp/evil.so"}, "-plugin");
  refused({"-readconfig", "/etc/evil.cfg"}, "-readconfig");
  refused({"-run-with", "user=root"}, "-run-with");
  refused({"-runas", "root"}, "-runas");
  refused({"-sandbox", "off"}, "-sandbox");
  refused({"-netdev", "tap,id=n1,script=/tmp/evil.sh"}, "script=");
  refused({"-netdev", "bridge,id=n1,br=br0"}, "bridge");
  refused({"-netdev", "user,id=n1,guestfwd=tcp:10.0.2.1:1-cmd:/bin/sh"}, "guestfwd");
  refused({"-netdev", "tap,id=n1,helper=/usr/lib/qemu/qemu-bridge-helper"}, "helper");
  refused({"-chardev", "pipe,id=c1,path=/tmp/fifo"}, "pipe");
  refused({"-chardev", "socket,id=c1,host=10.0.0.1,port=22"}, "unix sockets");
  refused({"-kernel", "/etc/shadow"}, "/etc/shadow");
  refused({"-kernel", t.images() + "/../other/k"}, "not inside");
  refused({"-drive", "file=/etc/shadow,if=virtio,format=raw,readonly=on"}, "/etc/shadow");
  refused({"-drive", "file=" + t.images() + "/rw.img,if=virtio,format=raw"}, "replica");
  refused({"-drive", "file=" + t.disks() + "/0.img,if=virtio"}, "format=raw");
  refused({"-drive", "file=" + t.disks() + "/0.img,if=virtio,format=raw,file.driver=ssh"}, "file.driver");
  refused({"-blockdev", R"({"driver":"nbd","server":{"type":"inet","host":"evil","port":"10809"},"node-name":"x"})"},
          "nbd");
  refused({"-blockdev", "driver=file,filename=/root/.ssh/id_rsa,node-name=x"}, "id_rsa");
  refused({"-device", "vfio-pci,host=01:00.0"}, "vfio-pci");
  refused({"-device", "virtio-net-pci,romfile=/etc/shadow"}, "romfile");
  refused({"-object", "memory-backend-file,id=m,mem-path=/dev/mem,size=1M"}, "memory-backend-file");
  refused({"-object", "rng-random,id=r,filename=/etc/shadow"}, "rng-random");
  CHECK(mentions(check_twin_cmdline({kQemu, "-D", "/etc/cron.d/evil"}, p), "-D"));  // (make_twin relocates it)
  refused({"-trace", "events=/etc/shadow"}, "events=");
  refused({"-L", "/"}, "-L");
  refused({"-display", "gtk"}, "-display");
  refused({"-vnc", "0.0.0.0:0"}, "-vnc");
  refused({"-fsdev", "local,id=f,path=/,security_model=none"}, "-fsdev");
  refused({"-s"}, "-s");
  refused({"-gdb", "tcp::1234"}, "-gdb");
  refused({"-machine", "q35,dumpdtb=/etc/passwd"}, "dumpdtb");
  refused({"-smbios", "file=/etc/shadow"}, "/etc/shadow");
  refused({"-fw_cfg", "name=opt/x,file=/etc/shadow"}, "/etc/shadow");
  refused({"-acpitable", "file=" + t.images() + "/ok.aml:/etc/shadow"}, "/etc/shadow");
  refused({"-frobnicate", "x"}, "allow-list");
  refused({"-icount", "shift=auto,rr=record,rrfile=/etc/x"}, "-icount");
  refused({"-boot", "menu=on,splash=/etc/shadow"}, "splash=");
  // Removed by make_twin_cmdline (never reach the twin) and refused if they did.
  CHECK(mentions(check_twin_cmdline({kQemu, "-add-fd", "fd=3,set=1"}, p), "-add-fd"));
  CHECK(mentions(check_twin_cmdline({kQemu, "-daemonize"}, p), "-daemonize"));
  CHECK(mentions(check_twin_cmdline({kQemu, "-monitor", "unix:/tmp/m.sock,server"}, p), "-monitor"));
  CHECK(mentions(check_twin_cmdline({kQemu, "-incoming", "tcp:0:4444"}, p), "-incoming"));
  // The binary itself.
  auto a = twin_of(t, guest(t));
  a[0] = "/bin/sh";
  CHECK(mentions(check_twin_cmdline(a, p), "/bin/sh"));
}

TEST_CASE("paths must be inside the allowed directories, symlinks resolved", "[security]") {
  Tree t;
  CHECK(path_inside(t.images() + "/vmlinux", {t.images()}));
  CHECK(path_inside(t.images() + "/sub/dir/x", {t.images() + "/"}));
  CHECK_FALSE(path_inside(t.images(), {t.images()}));
  CHECK_FALSE(path_inside(t.images() + "x/y", {t.images()}));
  CHECK_FALSE(path_inside(t.images() + "/../other/x", {t.images()}));
  CHECK_FALSE(path_inside(t.images() + "/./x", {t.images()}));
  CHECK_FALSE(path_inside("relative/x", {t.images()}));
  CHECK_FALSE(path_inside("", {t.images()}));
  CHECK_FALSE(path_inside(t.images() + "/x", {""}));
  // A symlink inside an allowed directory that leads out of it.
  REQUIRE(::symlink((t.root + "/other").c_str(), (t.images() + "/escape").c_str()) == 0);
  CHECK_FALSE(path_inside(t.images() + "/escape/secret", {t.images()}));
}

namespace {

std::string domain(const std::string& devices, const std::string& extra = "") {
  return "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n"
         "  <name>ft1</name>\n  <uuid>8a1d5c2e-3f3b-4f4e-9a7e-2b1c0d9e8f70</uuid>\n"
         "  <memory unit='KiB'>262144</memory>\n"
         "  <os><type arch='x86_64' machine='q35'>hvm</type></os>\n"
         "  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
         "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
         "<source file='/var/lib/libvirt/images/ft1.qcow2'/><target dev='vda' bus='virtio'/></disk>\n" +
         devices + "  </devices>\n" + extra + "</domain>\n";
}

TwinXmlOptions xopts(const Tree& t, const TwinPolicy& p) {
  TwinXmlOptions x;
  x.disk_files["/var/lib/libvirt/images/ft1.qcow2"] = t.disks() + "/0.img";
  x.socket_dir = t.run();
  x.policy = &p;
  x.extra_qemu_args = {"-incoming", "defer", "-global", "migration.send-configuration=off"};
  return x;
}

}  // namespace

TEST_CASE("a twin's libvirt XML: emulator replaced, ftd's own arguments only", "[security]") {
  Tree t;
  auto p = t.policy();
  auto out = twin_xml(domain("    <serial type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/s.sock'/></serial>\n"),
                      xopts(t, p));
  CHECK(out.find("<emulator>/usr/bin/qemu-system-x86_64</emulator>") != std::string::npos);
  CHECK(out.find(t.run() + "/s.sock") != std::string::npos);
  CHECK(out.find("migration.send-configuration=off") != std::string::npos);
  // The emulator is picked by basename among the allowed binaries, never the primary's path.
  auto moved = twin_xml(domain("").replace(domain("").find("/usr/bin/qemu-system-x86_64"), 27,
                                            "/primary/build/qemu-system-x86_64"),
                        xopts(t, p));
  CHECK(moved.find("<emulator>/usr/bin/qemu-system-x86_64</emulator>") != std::string::npos);
  // ftd's own arguments in the input (a twin's XML passed on) are tolerated and not doubled.
  auto x2 = xopts(t, p);
  x2.disk_files.clear();
  auto again = twin_xml(out, x2);
  CHECK(again.find("defer") == again.rfind("defer"));
}

TEST_CASE("hostile libvirt XML is refused, each problem named", "[security]") {
  Tree t;
  auto p = t.policy();
  auto refused = [&](const std::string& devices, const std::string& extra, const std::string& word) {
    INFO(devices + extra);
    CHECK_THROWS_WITH(twin_xml(domain(devices, extra), xopts(t, p)),
                      Catch::Contains(word) && Catch::Contains("Security"));
  };
  refused("", "  <qemu:commandline><qemu:arg value='-plugin'/><qemu:arg value='file=/tmp/e.so'/></qemu:commandline>\n",
          "qemu:commandline");
  refused("", "  <qemu:commandline><qemu:env name='LD_PRELOAD' value='/tmp/e.so'/></qemu:commandline>\n",
          "qemu:commandline");
  refused("", "  <qemu:override><qemu:device alias='x'/></qemu:override>\n", "qemu:override");
  CHECK_THROWS_WITH(twin_xml(domain("").replace(domain("").find("/usr/bin/qemu-system-x86_64"), 27, "/bin/sh"),
                             xopts(t, p)),
                    Catch::Contains("/bin/sh"));
  refused("    <disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdb'/></disk>\n", "",
          "/etc/shadow");
  refused("    <disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdb'/></disk>\n", "",
          "type='block'");
  refused("    <disk type='network' device='disk'><source protocol='nbd' name='x'><host name='evil'/></source>"
          "<target dev='vdb'/></disk>\n",
          "", "type='network'");
  refused("    <disk type='file' device='cdrom'><source file='/root/secret.iso'/><target dev='sda'/><readonly/></disk>\n",
          "", "/root/secret.iso");
  refused("    <serial type='unix'><source mode='connect' path='/var/run/docker.sock'/></serial>\n", "",
          "docker.sock");
  refused("    <serial type='tcp'><source mode='connect' host='10.0.0.1' service='22'/></serial>\n", "", "tcp");
  refused("    <serial type='dev'><source path='/dev/ttyS0'/></serial>\n", "", "dev");
  refused("    <interface type='ethernet'><script path='/tmp/evil.sh'/></interface>\n", "", "script");
  refused("    <hostdev mode='subsystem' type='pci'/>\n", "", "hostdev");
  refused("    <filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>\n", "", "filesystem");
  refused("    <interface type='network'><rom file='/etc/shadow'/></interface>\n", "", "/etc/shadow");
  // <os> inputs outside the allowed directories.
  auto os_domain = domain("").replace(domain("").find("</os>"), 5,
                                      "<kernel>/etc/shadow</kernel><nvram>/etc/cron.d/evil</nvram></os>");
  CHECK_THROWS_WITH(twin_xml(os_domain, xopts(t, p)), Catch::Contains("<os><kernel>") && Catch::Contains("<os><nvram>"));
}

TEST_CASE("ftd makes only its own run directories reachable, never their ancestors", "[security]") {
  Tree t;  // t.root is 0700 (mkdtemp): the operator's directory above --run-dir
  const std::string run = t.root + "/ftd-run", vm = run + "/vms/vm1";
  std::filesystem::create_directories(vm);
  REQUIRE(::chmod(run.c_str(), 0700) == 0);
  REQUIRE(::chmod(vm.c_str(), 0700) == 0);
  struct stat st {};
  CHECK_THROWS_WITH(ftvm::ftd::make_run_dir_reachable(vm, run),
                    Catch::Contains(t.root) && Catch::Contains("not searchable"));
  REQUIRE(::stat(t.root.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0700);  // not changed
  REQUIRE(::chmod(t.root.c_str(), 0711) == 0);
  ftvm::ftd::make_run_dir_reachable(vm, run);
  for (const auto& d : {run, run + "/vms", vm}) {
    REQUIRE(::stat(d.c_str(), &st) == 0);
    CHECK((st.st_mode & 0111) == 0111);
  }
  CHECK_THROWS_AS(ftvm::ftd::make_run_dir_reachable("/etc", run), ftvm::Error);  // not inside the run dir
}
