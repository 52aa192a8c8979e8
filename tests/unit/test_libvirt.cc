// libvirt glue: the pure domain-XML functions (libvirt_xml.h), QMP reply parsing, and
// Connection/Domain against libvirt's built-in test driver (test:///default, no daemon needed).
#include <catch2/catch.hpp>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "vmm-glue/libvirt.h"
#include "vmm-glue/libvirt_xml.h"

using namespace ftvm;
using namespace ftvm::vmm;
using json = nlohmann::json;

namespace {

// What `virsh dumpxml` shows for a running q35 domain prepared for ftvm, except for the
// balloon and the NIC's vhost driver (libvirt's defaults), which prepare_check() must flag.
const char* kDomainXml = R"(<domain type='kvm' id='3'>
  <name>ft1</name>
  <uuid>4d3c2a1b-9e8f-4a7b-8c6d-5e4f3a2b1c0d</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    <ftvm:protection xmlns:ftvm="https://ftvm.dev/xmlns/protection/1" peer="standby.example:7410" transport="tcp" epoch-ms="40" failover="auto"/>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <vcpu placement='static'>2</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/ft1.qcow2' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/debian-12-base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/seed.iso' index='1'/>
      <backingStore/>
      <target dev='sda' bus='sata'/>
      <readonly/>
      <alias name='sata0-0-0'/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <controller type='pci' index='0' model='pcie-root'>
      <alias name='pcie.0'/>
    </controller>
    <controller type='virtio-serial' index='0'>
      <alias name='virtio-serial0'/>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </controller>
    <controller type='sata' index='0'>
      <alias name='ide'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
    </controller>
    <interface type='network'>
      <mac address='52:54:00:6b:3c:58'/>
      <source network='default' portid='0c8a2f7e-1111-4b7a-9b0e-6a7c1d2e3f40' bridge='virbr0'/>
      <target dev='vnet2'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <serial type='pty'>
      <source path='/dev/pts/3'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <console type='pty' tty='/dev/pts/3'>
      <source path='/dev/pts/3'/>
      <target type='serial' port='0'/>
      <alias name='serial0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/3-ft1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>
      <alias name='channel0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <input type='mouse' bus='ps2'>
      <alias name='input0'/>
    </input>
    <memballoon model='virtio'>
      <stats period='5'/>
      <alias name='balloon0'/>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </memballoon>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'>
    <label>libvirt-4d3c2a1b-9e8f-4a7b-8c6d-5e4f3a2b1c0d</label>
    <imagelabel>libvirt-4d3c2a1b-9e8f-4a7b-8c6d-5e4f3a2b1c0d</imagelabel>
  </seclabel>
</domain>
)";

std::string replace(std::string s, const std::string& from, const std::string& to) {
  size_t p = s.find(from);
  REQUIRE(p != std::string::npos);
  return s.replace(p, from.size(), to);
}

bool contains(const std::string& s, const std::string& sub) {
  return s.find(sub) != std::string::npos;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

const PrepareIssue* find_issue(const std::vector<PrepareIssue>& v, const std::string& sub) {
  for (const auto& i : v)
    if (contains(i.what, sub)) return &i;
  return nullptr;
}

std::string issues_text(const std::vector<PrepareIssue>& v) {
  std::string s;
  for (const auto& i : v) s += "- " + i.what + " -> " + i.fix + "\n";
  return s;
}

}  // namespace

// ---- protection ---------------------------------------------------------------------------------

TEST_CASE("parse_protection reads the element from a domain XML", "[libvirt]") {
  auto p = parse_protection(kDomainXml);
  REQUIRE(p);
  CHECK(p->peer == "standby.example:7410");
  CHECK(p->transport == "tcp");
  CHECK(p->epoch_ms == 40);
  CHECK(p->failover == "auto");

  // Absent -> nullopt, also with other namespaces' metadata and no <metadata> at all.
  std::string without = replace(kDomainXml,
                                R"(<ftvm:protection xmlns:ftvm="https://ftvm.dev/xmlns/protection/1" peer="standby.example:7410" transport="tcp" epoch-ms="40" failover="auto"/>)",
                                "");
  CHECK_FALSE(parse_protection(without));
  CHECK_FALSE(parse_protection("<domain type='kvm'><name>x</name></domain>"));
  // Same local name in another namespace is not ours.
  CHECK_FALSE(parse_protection(
      "<domain><metadata><p:protection xmlns:p='https://example.org/x' peer='h'/></metadata></domain>"));
  // Any prefix bound to our namespace is ours (libvirt may keep the caller's prefix).
  auto q = parse_protection(
      "<domain><metadata><x:protection xmlns:x='https://ftvm.dev/xmlns/protection/1' "
      "xmlns:ftvm='https://ftvm.dev/xmlns/protection/1' peer='h'/></metadata></domain>");
  REQUIRE(q);
  CHECK(*q == Protection{"h", "auto", 25, "auto", ""});
}

TEST_CASE("parse_protection reads what virDomainGetMetadata returns", "[libvirt]") {
  // libvirt strips the namespace from the element it returns (observed with libvirt 9.0).
  auto p = parse_protection(R"(<protection peer="10.0.0.2" epoch-ms="100"/>)");
  REQUIRE(p);
  CHECK(*p == Protection{"10.0.0.2", "auto", 100, "auto", ""});
  CHECK(parse_protection(R"(<protection xmlns:ftvm="https://ftvm.dev/xmlns/protection/1" peer="h:1"/>)"));
  CHECK(parse_protection(R"(<ftvm:protection peer="h"/>)"));  // dangling prefix
  CHECK(parse_protection(
      R"(<ftvm:protection xmlns:ftvm="https://ftvm.dev/xmlns/protection/1" peer="[fe80::1]:7410" transport="rdma"/>)")
            ->transport == "rdma");
  CHECK_THROWS_WITH(parse_protection(R"(<protection xmlns="https://other/" peer="h"/>)"),
                    Catch::Contains("namespace 'https://other/'"));
  CHECK_THROWS_WITH(parse_protection("<peer/>"), Catch::Contains("expected <domain> or <protection>"));
}

TEST_CASE("parse_protection rejects invalid elements naming the attribute", "[libvirt]") {
  auto bad = [](const std::string& attrs) {
    return error_of([&] { parse_protection("<protection " + attrs + "/>"); });
  };
  CHECK(contains(bad("transport='tcp'"), "peer is missing"));
  CHECK(contains(bad("peer=''"), "peer is missing"));
  CHECK(contains(bad("peer='h:0'"), "port '0'"));
  CHECK(contains(bad("peer='h:70000'"), "1..65535"));
  CHECK(contains(bad("peer='h:x'"), "port 'x'"));
  CHECK(contains(bad("peer=':7410'"), "host is empty"));
  CHECK(contains(bad("peer='[fe80::1'"), "IPv6"));
  CHECK(contains(bad("peer='a b'"), "space"));
  CHECK(contains(bad("peer='h' transport='udp'"), "transport='udp'"));
  CHECK(contains(bad("peer='h' transport='udp'"), "auto, tcp or rdma"));
  CHECK(contains(bad("peer='h' epoch-ms='0'"), "epoch-ms='0'"));
  CHECK(contains(bad("peer='h' epoch-ms='10001'"), "1 to 10000"));
  CHECK(contains(bad("peer='h' epoch-ms='25ms'"), "not an integer"));
  CHECK(contains(bad("peer='h' epoch-ms='-5'"), "not an integer"));
  CHECK(contains(bad("peer='h' failover='manual'"), "failover='manual'"));
  CHECK(contains(bad("peer='h' epoch_ms='30'"), "unknown attribute epoch_ms"));
  CHECK(parse_protection("<protection peer='h' epoch-ms='10000'/>")->epoch_ms == 10000);
  CHECK(parse_protection("<protection peer='h' epoch-ms='1'/>")->epoch_ms == 1);
  CHECK(parse_protection("<protection peer='fe80::1'/>")->peer == "fe80::1");  // bare IPv6
  // The same rules inside a domain.
  CHECK_THROWS_WITH(parse_protection("<domain><metadata><ftvm:protection "
                                     "xmlns:ftvm='https://ftvm.dev/xmlns/protection/1' peer='h' "
                                     "transport='ib'/></metadata></domain>"),
                    Catch::Contains("transport='ib'"));
  // Two elements: ambiguous.
  CHECK_THROWS_WITH(parse_protection("<domain><metadata>"
                                     "<a:protection xmlns:a='https://ftvm.dev/xmlns/protection/1' peer='h'/>"
                                     "<b:protection xmlns:b='https://ftvm.dev/xmlns/protection/1' peer='g'/>"
                                     "</metadata></domain>"),
                    Catch::Contains("two"));
}

TEST_CASE("protection_element round-trips and validates", "[libvirt]") {
  Protection p{"standby&co.example:7410", "rdma", 30, "auto"};
  std::string e = protection_element(p);
  CHECK(e.rfind("<protection ", 0) == 0);
  CHECK_FALSE(contains(e, "xmlns"));  // libvirt adds it; declaring it breaks virDomainSetMetadata
  CHECK(contains(e, "&amp;"));
  CHECK(parse_protection(e) == p);
  std::string q = protection_element_qualified(p);
  CHECK(contains(q, "<ftvm:protection xmlns:ftvm=\"https://ftvm.dev/xmlns/protection/1\""));
  CHECK(parse_protection("<domain><metadata>" + q + "</metadata></domain>") == p);
  CHECK(parse_protection(protection_element(Protection{"h"})) == Protection{"h", "auto", 25, "auto", ""});
  CHECK_THROWS_WITH(protection_element(Protection{""}), Catch::Contains("peer"));
  CHECK_THROWS_WITH(protection_element(Protection{"h", "tcp", 0}), Catch::Contains("epoch-ms"));
  // The per-VM arbiter travels in the element; a value that is no arbiter kind is refused.
  CHECK(parse_protection(protection_element(Protection{"h", "auto", 25, "auto", "none"}))->arbiter == "none");
  CHECK(protection_element(Protection{"h"}).find("arbiter") == std::string::npos);
  CHECK_THROWS_WITH(protection_element(Protection{"h", "auto", 25, "auto", "x'/><evil"}), Catch::Contains("arbiter"));
  CHECK_THROWS_WITH(parse_protection(R"(<protection peer="h" arbiter="Corosync!"/>)"), Catch::Contains("arbiter"));
}

TEST_CASE("malformed XML gives a clear error", "[libvirt]") {
  CHECK_THROWS_WITH(prepare_check("<domain><name>x</domain>"),
                    Catch::Contains("domain XML: malformed XML at line 1"));
  CHECK_THROWS_WITH(prepare_check(""), Catch::Contains("empty document"));
  CHECK_THROWS_WITH(prepare_check("not xml at all"), Catch::Contains("malformed XML"));
  CHECK_THROWS_WITH(twin_xml("<domain>", {}), Catch::Contains("malformed XML"));
  CHECK_THROWS_WITH(disk_sources("<network><name>default</name></network>"),
                    Catch::Contains("root element is <network>, expected <domain>"));
  CHECK_THROWS_WITH(parse_protection("<protection peer='h'"), Catch::Contains("malformed XML"));
  CHECK_THROWS_WITH(prepare_fix("<domain>\n<devices>\n</domain>"), Catch::Contains("line 3"));
}

// ---- prepare ------------------------------------------------------------------------------------

TEST_CASE("prepare_check flags the balloon and the vhost NIC of a memfd domain", "[libvirt]") {
  auto issues = prepare_check(kDomainXml);
  INFO(issues_text(issues));
  REQUIRE(issues.size() == 2);
  const PrepareIssue* b = find_issue(issues, "memballoon model='virtio'");
  REQUIRE(b);
  CHECK(b->fixable);
  CHECK(b->needs_restart);
  CHECK(contains(b->fix, "<memballoon model='none'/>"));
  const PrepareIssue* n = find_issue(issues, "mac 52:54:00:6b:3c:58");
  REQUIRE(n);
  CHECK(contains(n->what, "vhost"));
  CHECK(n->fixable);
  CHECK(contains(n->fix, "<driver name='qemu'/>"));
}

TEST_CASE("prepare_fix yields a definition prepare_check accepts", "[libvirt]") {
  std::string fixed = prepare_fix(kDomainXml);
  INFO(fixed);
  CHECK(prepare_check(fixed).empty());
  CHECK(contains(fixed, "<memballoon model=\"none\"/>"));
  CHECK_FALSE(contains(fixed, "<stats period"));
  CHECK(contains(fixed, "<driver name=\"qemu\"/>"));
  // Everything else is untouched (layout included) and the result parses.
  CHECK(contains(fixed, "<source file=\"/var/lib/libvirt/images/ft1.qcow2\" index=\"2\"/>"));
  CHECK(contains(fixed, "\n      <model type=\"virtio\"/>\n      <alias name=\"net0\"/>"));
  CHECK(parse_protection(fixed)->peer == "standby.example:7410");
  CHECK(disk_sources(fixed) == disk_sources(kDomainXml));
  // Idempotent.
  CHECK(prepare_fix(fixed) == fixed);
}

TEST_CASE("prepare_check: RAM backing, hugepages, NUMA", "[libvirt]") {
  std::string base = prepare_fix(kDomainXml);
  // No memoryBacking at all (libvirt's default: anonymous private RAM).
  std::string none = replace(base,
                             "<memoryBacking>\n    <source type=\"memfd\"/>\n    <access mode=\"shared\"/>\n  </memoryBacking>\n  ",
                             "");
  auto issues = prepare_check(none);
  REQUIRE(issues.size() == 1);
  CHECK(contains(issues[0].what, "not a shared memfd"));
  CHECK(issues[0].fix == "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>");
  CHECK(issues[0].fixable);
  std::string fixed = prepare_fix(none);
  CHECK(prepare_check(fixed).empty());
  // Placed after <currentMemory>, indented like its siblings.
  CHECK(contains(fixed, "</currentMemory>\n  <memoryBacking>\n    <source type=\"memfd\"/>\n    "
                        "<access mode=\"shared\"/>\n  </memoryBacking>\n  <vcpu"));

  // File-backed, private, with hugepages.
  std::string huge = replace(base, "<source type=\"memfd\"/>\n    <access mode=\"shared\"/>",
                             "<hugepages>\n      <page size='2048' unit='KiB'/>\n    </hugepages>\n"
                             "    <source type='file'/>\n    <access mode='private'/>");
  issues = prepare_check(huge);
  INFO(issues_text(issues));
  REQUIRE(issues.size() == 2);
  CHECK(find_issue(issues, "source type 'file', access mode 'private'"));
  CHECK(find_issue(issues, "hugepages"));
  fixed = prepare_fix(huge);
  CHECK(prepare_check(fixed).empty());
  CHECK_FALSE(contains(fixed, "hugepages"));
  CHECK(contains(fixed, "<source type=\"memfd\"/>"));

  // NUMA: one cell with private access is fixable, two cells are not.
  std::string cpu = "<cpu mode=\"host-passthrough\" check=\"none\" migratable=\"on\"/>";
  std::string one = replace(base, cpu,
                            "<cpu mode='host-passthrough'>\n    <numa>\n      <cell id='0' cpus='0-1' "
                            "memory='2097152' unit='KiB' memAccess='private'/>\n    </numa>\n  </cpu>");
  issues = prepare_check(one);
  REQUIRE(issues.size() == 1);
  CHECK(contains(issues[0].what, "memAccess='private'"));
  CHECK(prepare_check(prepare_fix(one)).empty());
  std::string two = replace(base, cpu,
                            "<cpu mode='host-passthrough'><numa><cell id='0' cpus='0' memory='1048576'/>"
                            "<cell id='1' cpus='1' memory='1048576'/></numa></cpu>");
  issues = prepare_check(two);
  REQUIRE(issues.size() == 1);
  CHECK(contains(issues[0].what, "2 NUMA cells"));
  CHECK_FALSE(issues[0].fixable);
  CHECK(prepare_check(prepare_fix(two)).size() == 1);
}

TEST_CASE("prepare_check: a missing balloon element is a balloon", "[libvirt]") {
  std::string base = prepare_fix(kDomainXml);
  std::string nob = replace(base, "\n    <memballoon model=\"none\"/>", "");
  auto issues = prepare_check(nob);
  REQUIRE(issues.size() == 1);
  CHECK(contains(issues[0].what, "no <memballoon> element"));
  std::string fixed = prepare_fix(nob);
  CHECK(prepare_check(fixed).empty());
  CHECK(contains(fixed, "<memballoon model=\"none\"/>\n  </devices>"));
  // A domain without <devices> gets one.
  std::string bare =
      "<domain type='kvm'><name>x</name><memoryBacking><source type='memfd'/><access "
      "mode='shared'/></memoryBacking></domain>";
  CHECK(prepare_check(bare).size() == 1);
  CHECK(prepare_check(prepare_fix(bare)).empty());
}

TEST_CASE("prepare_check: devices that cannot be protected are not fixable", "[libvirt]") {
  std::string base = prepare_fix(kDomainXml);
  auto with = [&](const std::string& dev) {
    return replace(base, "<memballoon model=\"none\"/>", "<memballoon model=\"none\"/>\n    " + dev);
  };
  struct Case {
    std::string dev, what, fix;
  } cases[] = {
      {"<interface type='vhostuser'><mac address='52:54:00:00:00:09'/><source type='unix' "
       "path='/run/vhu.sock' mode='client'/><model type='virtio'/></interface>",
       "vhost-user", "emulated NIC"},
      {"<interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/></interface>", "vhost-vDPA",
       "emulated NIC"},
      {"<interface type='hostdev' managed='yes'><source><address type='pci' domain='0' bus='3' "
       "slot='0' function='1'/></source></interface>",
       "VFIO", "emulated NIC"},
      {"<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' bus='6' "
       "slot='0' function='0'/></source></hostdev>",
       "<hostdev type='pci'>", "remove the <hostdev>"},
      {"<memory model='virtio-mem'><target><size unit='GiB'>4</size><node>0</node><block "
       "unit='MiB'>2</block></target></memory>",
       "<memory model='virtio-mem'>", "remove the <memory>"},
      {"<memory model='dimm'><target><size unit='GiB'>1</size></target></memory>",
       "<memory model='dimm'>", "remove the <memory>"},
      {"<memory model='nvdimm'><source><path>/tmp/nv</path></source><target><size "
       "unit='MiB'>512</size></target></memory>",
       "<memory model='nvdimm'>", "remove the <memory>"},
      {"<filesystem type='mount'><driver type='virtiofs'/><source dir='/srv'/><target "
       "dir='srv'/></filesystem>",
       "virtiofs", "remove the <filesystem>"},
      {"<vsock model='virtio'><cid auto='yes'/></vsock>", "vhost-vsock", "remove the <vsock>"},
      {"<shmem name='ivshmem0'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>",
       "<shmem name='ivshmem0'>", "remove the <shmem>"},
      {"<disk type='vhostuser' device='disk'><source type='unix' path='/tmp/vhost-blk.sock'/>"
       "<target dev='vdb' bus='virtio'/></disk>",
       "type='vhostuser'", "local image"},
      {"<disk type='block' device='disk'><source dev='/dev/vg0/data'/><target dev='vdb' "
       "bus='virtio'/></disk>",
       "writable disk vdb (source dev='/dev/vg0/data') is type='block'", "<disk type='file'"},
      {"<disk type='network' device='disk'><source protocol='nbd' name='x'><host "
       "name='nbd.example' port='10809'/></source><target dev='vdc' bus='virtio'/></disk>",
       "type='network'", "<readonly/>"},
      {"<video><model type='virtio'/><driver name='vhostuser'/></video>", "vhost-user GPU",
       "vhostuser"},
  };
  for (const auto& c : cases) {
    INFO(c.dev);
    std::string xml = with(c.dev);
    auto issues = prepare_check(xml);
    INFO(issues_text(issues));
    REQUIRE(issues.size() == 1);
    CHECK(contains(issues[0].what, c.what));
    CHECK(contains(issues[0].fix, c.fix));
    CHECK_FALSE(issues[0].fixable);
    CHECK(issues[0].needs_restart);
    // Nothing fixable: the fix changes nothing (compared after one serialisation by libxml2).
    std::string once = prepare_fix(xml);
    CHECK(prepare_check(once).size() == 1);
    CHECK(prepare_fix(once) == once);
    CHECK(once.size() == xml.size());  // only ' became "
  }
  // Read-only block disks and CD-ROMs on block devices are fine; so is a 9p filesystem, a
  // virtio NIC of type user (no vhost) and an explicit qemu driver.
  for (const std::string ok :
       {"<disk type='block' device='disk'><source dev='/dev/sr0'/><target dev='vdd'/><readonly/></disk>",
        "<disk type='block' device='cdrom'><source dev='/dev/sr0'/><target dev='sdb'/></disk>",
        "<filesystem type='mount'><driver type='path'/><source dir='/srv'/><target dir='srv'/></filesystem>",
        "<interface type='user'><model type='virtio'/></interface>",
        "<interface type='bridge'><source bridge='br0'/><model type='virtio-non-transitional'/>"
        "<driver name='qemu' queues='2'/></interface>",
        "<interface type='bridge'><source bridge='br0'/><model type='e1000e'/></interface>"}) {
    INFO(ok);
    CHECK(prepare_check(with(ok)).empty());
  }
  // An explicit vhost driver keeps its other settings when fixed.
  std::string vh = with("<interface type='bridge'><source bridge='br0'/><model type='virtio'/>"
                        "<driver name='vhost' queues='4'/></interface>");
  REQUIRE(prepare_check(vh).size() == 1);
  CHECK(contains(prepare_check(vh)[0].what, "driver name vhost"));
  CHECK(contains(prepare_fix(vh), "<driver name=\"qemu\" queues=\"4\"/>"));
}

// ---- twin ---------------------------------------------------------------------------------------

TEST_CASE("twin_xml renames, maps disks, drops protection, adds QEMU args", "[libvirt]") {
  TwinXmlOptions o;
  o.name = "ft1-twin";
  o.uuid = "generate";
  o.disk_files["/var/lib/libvirt/images/ft1.qcow2"] = "/var/lib/ftvm/replicas/ft1-vda.raw";
  o.extra_qemu_args = {"-incoming", "defer", "-global", "migration.send-configuration=off"};
  std::string t = twin_xml(kDomainXml, o);
  INFO(t);
  CHECK(contains(t, "<name>ft1-twin</name>"));
  CHECK_FALSE(contains(t, "<uuid>"));
  CHECK_FALSE(contains(t, "id=\"3\""));
  CHECK_FALSE(contains(t, "id='3'"));
  // The disk: replica, raw, no backing chain; the CD-ROM is untouched.
  CHECK(contains(t, "<driver name=\"qemu\" type=\"raw\" discard=\"unmap\"/>"));
  CHECK(contains(t, "<source file=\"/var/lib/ftvm/replicas/ft1-vda.raw\" index=\"2\"/>"));
  CHECK_FALSE(contains(t, "debian-12-base.qcow2"));
  CHECK_FALSE(contains(t, "ft1.qcow2"));
  CHECK(contains(t, "seed.iso"));
  CHECK(disk_sources(t) == std::vector<std::string>{"/var/lib/ftvm/replicas/ft1-vda.raw"});
  // Protection gone, other metadata kept.
  CHECK_FALSE(parse_protection(t));
  CHECK_FALSE(contains(t, "ftvm.dev"));
  CHECK(contains(t, "libosinfo:os"));
  // QEMU args in order, namespace declared on <domain>.
  CHECK(contains(t, "<domain xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\" type=\"kvm\">"));
  CHECK(contains(t, "<qemu:commandline>\n    <qemu:arg value=\"-incoming\"/>\n    <qemu:arg "
                    "value=\"defer\"/>\n    <qemu:arg value=\"-global\"/>\n    <qemu:arg "
                    "value=\"migration.send-configuration=off\"/>\n  </qemu:commandline>\n</domain>"));
  // The seclabel stays (documented).
  CHECK(contains(t, "<seclabel type=\"dynamic\""));
  // Still a domain the prepare rules see the same way (the twin inherits the definition).
  CHECK(prepare_check(t).size() == prepare_check(kDomainXml).size());
}

TEST_CASE("twin_xml: uuid, existing qemu:commandline, metadata, errors", "[libvirt]") {
  // Keep everything: only the live id goes.
  std::string same = twin_xml(kDomainXml, {});
  CHECK(contains(same, "<name>ft1</name>"));
  CHECK(contains(same, "<uuid>4d3c2a1b-9e8f-4a7b-8c6d-5e4f3a2b1c0d</uuid>"));
  CHECK(contains(same, "<driver name=\"qemu\" type=\"qcow2\" discard=\"unmap\"/>"));
  CHECK_FALSE(contains(same, "qemu:commandline"));
  // An explicit UUID replaces the primary's, and is inserted after <name> when absent.
  TwinXmlOptions o;
  o.uuid = "11111111-2222-3333-4444-555555555555";
  CHECK(contains(twin_xml(kDomainXml, o), "<uuid>11111111-2222-3333-4444-555555555555</uuid>"));
  CHECK(contains(twin_xml("<domain>\n  <name>a</name>\n</domain>", o),
                 "<name>a</name>\n  <uuid>11111111-2222-3333-4444-555555555555</uuid>\n</domain>"));
  o.uuid = "not-a-uuid";
  CHECK_THROWS_WITH(twin_xml(kDomainXml, o), Catch::Contains("'not-a-uuid' is not a UUID"));

  // Existing qemu:commandline (under another prefix) is extended, not duplicated.
  std::string withcl =
      "<domain type='kvm' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'>\n"
      "  <name>a</name>\n"
      "  <metadata>\n"
      "    <ftvm:protection xmlns:ftvm='https://ftvm.dev/xmlns/protection/1' peer='h'/>\n"
      "  </metadata>\n"
      "  <devices>\n"
      "    <disk type='file' device='disk'>\n"
      "      <source file='/img/a.qcow2'/>\n"
      "      <target dev='vda' bus='virtio'/>\n"
      "    </disk>\n"
      "  </devices>\n"
      "  <q:commandline>\n"
      "    <q:arg value='-msg'/>\n"
      "    <q:arg value='timestamp=on'/>\n"
      "  </q:commandline>\n"
      "</domain>\n";
  TwinXmlOptions o2;
  o2.extra_qemu_args = {"-S"};
  o2.disk_files["/img/a.qcow2"] = "/rep/a.raw";
  std::string t = twin_xml(withcl, o2);
  INFO(t);
  CHECK(contains(t, "<q:arg value=\"timestamp=on\"/>\n    <q:arg value=\"-S\"/>\n  </q:commandline>"));
  CHECK_FALSE(contains(t, "xmlns:qemu"));
  // A disk without <driver> gets one; the emptied <metadata> goes away.
  CHECK(contains(t, "<target dev=\"vda\" bus=\"virtio\"/>\n      <driver name=\"qemu\" type=\"raw\"/>\n    </disk>"));
  CHECK_FALSE(contains(t, "<metadata"));

  // A listed image no disk uses is an error naming it.
  TwinXmlOptions o3;
  o3.disk_files["/img/missing.qcow2"] = "/rep/m.raw";
  CHECK_THROWS_WITH(twin_xml(withcl, o3),
                    Catch::Contains("'/img/missing.qcow2'") && Catch::Contains("not the <source file"));
}

TEST_CASE("twin_xml: socket_dir relocates what the twin's QEMU creates", "[libvirt]") {
  TwinXmlOptions o;
  o.socket_dir = "/run/ftvm/vms/ft1/";
  std::string t = twin_xml(kDomainXml, o);
  CHECK(contains(t, "<source mode=\"bind\" path=\"/run/ftvm/vms/ft1/org.qemu.guest_agent.0\"/>"));
  CHECK(contains(t, "<source path=\"/dev/pts/3\"/>"));  // ptys are kept
  CHECK_FALSE(contains(twin_xml(kDomainXml, {}), "/run/ftvm"));

  std::string xml =
      "<domain><name>a</name><devices>"
      "<serial type='unix'><source mode='bind' path='/var/lib/a/serial.sock'/><log file='/var/log/a.log' append='on'/></serial>"
      "<console type='unix'><source mode='bind' path='/var/lib/a/serial.sock'/><target type='serial'/></console>"
      "<channel type='unix'><source mode='bind' path='/other/serial.sock'/></channel>"
      "<channel type='unix'><source mode='connect' path='/run/server.sock'/></channel>"
      "<parallel type='file'><source path='/var/log/a-parallel.log'/></parallel>"
      "<redirdev bus='usb' type='unix'><source mode='bind' path='/tmp/usbredir.sock'/></redirdev>"
      "<rng model='virtio'><backend model='egd' type='unix'><source mode='bind' path='/tmp/egd.sock'/></backend></rng>"
      "<graphics type='vnc' socket='/var/lib/a/vnc.sock'><listen type='socket' socket='/var/lib/a/vnc.sock'/></graphics>"
      "<graphics type='spice'><listen type='socket' socket='/var/lib/a/spice.sock'/></graphics>"
      "<disk type='file' device='disk'><source file='/img/serial.sock'/></disk>"
      "</devices></domain>";
  t = twin_xml(xml, o);
  INFO(t);
  // Same original -> same new path (serial and its console); same basename -> ".1".
  CHECK(contains(t, "<serial type=\"unix\"><source mode=\"bind\" path=\"/run/ftvm/vms/ft1/serial.sock\"/>"
                    "<log file=\"/run/ftvm/vms/ft1/a.log\" append=\"on\"/></serial>"));
  CHECK(contains(t, "<console type=\"unix\"><source mode=\"bind\" path=\"/run/ftvm/vms/ft1/serial.sock\"/>"));
  CHECK(contains(t, "path=\"/run/ftvm/vms/ft1/serial.sock.1\""));
  CHECK(contains(t, "<source mode=\"connect\" path=\"/run/server.sock\"/>"));
  CHECK(contains(t, "path=\"/run/ftvm/vms/ft1/a-parallel.log\""));
  CHECK(contains(t, "path=\"/run/ftvm/vms/ft1/usbredir.sock\""));
  CHECK(contains(t, "path=\"/run/ftvm/vms/ft1/egd.sock\""));
  CHECK(contains(t, "<graphics type=\"vnc\" socket=\"/run/ftvm/vms/ft1/vnc.sock\"><listen type=\"socket\" "
                    "socket=\"/run/ftvm/vms/ft1/vnc.sock\"/>"));
  CHECK(contains(t, "socket=\"/run/ftvm/vms/ft1/spice.sock\""));
  CHECK(contains(t, "<source file=\"/img/serial.sock\"/>"));  // disks are not sockets
}

TEST_CASE("disk_sources lists writable file disks", "[libvirt]") {
  CHECK(disk_sources(kDomainXml) == std::vector<std::string>{"/var/lib/libvirt/images/ft1.qcow2"});
  std::string xml =
      "<domain><devices>"
      "<disk type='file' device='disk'><source file='/a.img'/></disk>"
      "<disk type='file' device='disk'><source file='/ro.img'/><readonly/></disk>"
      "<disk type='file' device='cdrom'><source file='/x.iso'/></disk>"
      "<disk type='block' device='disk'><source dev='/dev/sdb'/></disk>"
      "<disk type='file' device='floppy'><source file='/f.img'/></disk>"
      "<disk type='file' device='disk'><target dev='vdz'/></disk>"
      "<disk device='lun' type='file'><source file='/b.img'/></disk>"
      "</devices></domain>";
  CHECK(disk_sources(xml) == std::vector<std::string>{"/a.img", "/f.img", "/b.img"});
  CHECK(disk_sources("<domain/>").empty());
}

TEST_CASE("looks_like_uuid", "[libvirt]") {
  CHECK(looks_like_uuid("6695eb01-f6a4-8304-79aa-97f2502e193f"));
  CHECK(looks_like_uuid("6695EB01F6A4830479AA97F2502E193F"));
  CHECK_FALSE(looks_like_uuid("test"));
  CHECK_FALSE(looks_like_uuid("6695eb01-f6a4-8304-79aa-97f2502e193g"));
  CHECK_FALSE(looks_like_uuid("6695eb01f-6a4-8304-79aa-97f2502e193f"));
}

// ---- QMP replies --------------------------------------------------------------------------------

TEST_CASE("parse_qmp_reply: return, error, malformed", "[libvirt]") {
  CHECK(parse_qmp_reply("query-status",
                        R"({"return":{"status":"running","singlestep":false,"running":true},"id":"libvirt-23"})") ==
        json{{"status", "running"}, {"singlestep", false}, {"running", true}});
  CHECK(parse_qmp_reply("stop", R"({"return": {}, "id": "libvirt-24"})") == json::object());
  CHECK(parse_qmp_reply("query-fdsets", R"({"return": []})") == json::array());
  try {
    parse_qmp_reply("device_del", R"({"id":"libvirt-25","error":{"class":"DeviceNotFound","desc":"Device 'x' not found"}})");
    FAIL("no QmpError");
  } catch (const QmpError& e) {
    CHECK(e.error_class() == "DeviceNotFound");
    CHECK(contains(e.what(), "device_del"));
    CHECK(contains(e.what(), "Device 'x' not found"));
  }
  try {
    parse_qmp_reply("x", R"({"error":"weird"})");
    FAIL("no QmpError");
  } catch (const QmpError& e) {
    CHECK(e.error_class() == "GenericError");
  }
  CHECK_THROWS_AS(parse_qmp_reply("stop", "not json"), ProtocolError);
  CHECK_THROWS_WITH(parse_qmp_reply("stop", "not json"), Catch::Contains("malformed reply"));
  CHECK_THROWS_AS(parse_qmp_reply("stop", "[1,2]"), ProtocolError);
  CHECK_THROWS_WITH(parse_qmp_reply("stop", R"({"id":"libvirt-1"})"),
                    Catch::Contains("neither \"return\" nor \"error\""));
  // A QMP error is not a protocol error (the monitor stays usable).
  try {
    parse_qmp_reply("cont", R"({"error":{"class":"GenericError","desc":"x"}})");
  } catch (const ProtocolError&) {
    FAIL("QMP error taken for a protocol error");
  } catch (const QmpError&) {
  }
}

// ---- libvirt's test driver ----------------------------------------------------------------------

TEST_CASE("Connection and Domain against test:///default", "[libvirt]") {
  auto conn = lv::Connection::open("test:///default");
  CHECK(conn.uri() == "test:///default");
  CHECK(conn.alive());
  auto names = lv::list_active(conn);
  CHECK(std::find(names.begin(), names.end(), "test") != names.end());

  auto dom = lv::Domain::lookup(conn, "test");
  CHECK(dom.name() == "test");
  CHECK(dom.uuid() == "6695eb01-f6a4-8304-79aa-97f2502e193f");
  CHECK(dom.active());
  CHECK(dom.persistent());
  CHECK(dom.state().state == "running");
  CHECK(dom.state().str().rfind("running (", 0) == 0);
  auto byuuid = lv::Domain::lookup(conn, "6695eb01-f6a4-8304-79aa-97f2502e193f");
  CHECK(byuuid.name() == "test");

  std::string x = dom.xml();
  CHECK(contains(x, "<name>test</name>"));
  CHECK(disk_sources(x) == std::vector<std::string>{"/guest/diskimage1"});
  CHECK(contains(dom.xml(true), "<name>test</name>"));
  CHECK(contains(dom.xml(false, true, true), "<name>test</name>"));

  // Missing domains: a distinct exception naming them.
  try {
    lv::Domain::lookup(conn, "no-such-vm");
    FAIL("no NoSuchDomain");
  } catch (const lv::NoSuchDomain& e) {
    CHECK(e.domain() == "no-such-vm");
    CHECK(contains(e.what(), "'no-such-vm' not found on test:///default"));
  }
  CHECK_THROWS_AS(lv::Domain::lookup(conn, "00000000-0000-0000-0000-000000000001"), lv::NoSuchDomain);

  // The test driver has no QEMU: no pid, no monitor.
  CHECK_THROWS_WITH(dom.qemu_pid(), Catch::Contains("not a QEMU connection"));
  CHECK_THROWS_WITH(LibvirtMonitor(conn, dom),
                    Catch::Contains("cannot register for QEMU monitor events") &&
                        Catch::Contains("libvirt domain test (test:///default)"));
}

TEST_CASE("protection metadata round trip on test:///default", "[libvirt]") {
  auto conn = lv::Connection::open("test:///default");
  auto dom = lv::Domain::lookup(conn, "test");
  // Each test:///default connection is its own private copy of the test driver's state.
  CHECK_FALSE(dom.metadata(kProtectionNs));

  Protection p{"standby.example:7410", "tcp", 50, "auto"};
  dom.set_metadata(protection_element(p), kProtectionPrefix, kProtectionNs, true, true);
  auto m = dom.metadata(kProtectionNs);
  REQUIRE(m);
  CHECK(parse_protection(*m) == p);
  REQUIRE(dom.metadata(kProtectionNs, true));
  CHECK(parse_protection(*dom.metadata(kProtectionNs, true)) == p);
  // In the domain XML, under the ftvm prefix.
  std::string x = dom.xml();
  CHECK(contains(x, "<ftvm:protection xmlns:ftvm=\"https://ftvm.dev/xmlns/protection/1\""));
  CHECK(parse_protection(x) == p);
  CHECK(parse_protection(dom.xml(true)) == p);

  // Replacing it.
  p.epoch_ms = 10;
  dom.set_metadata(protection_element(p), kProtectionPrefix, kProtectionNs, true, false);
  CHECK(parse_protection(*dom.metadata(kProtectionNs))->epoch_ms == 10);
  CHECK(parse_protection(*dom.metadata(kProtectionNs, true))->epoch_ms == 50);  // config untouched

  // libvirt refuses a snippet declaring the key's prefix itself: the message says why.
  CHECK_THROWS_WITH(dom.set_metadata(protection_element_qualified(p), kProtectionPrefix,
                                     kProtectionNs, true, false),
                    Catch::Contains("must not declare xmlns:ftvm"));

  dom.remove_metadata(kProtectionNs, true, true);
  CHECK_FALSE(dom.metadata(kProtectionNs));
  CHECK_FALSE(dom.metadata(kProtectionNs, true));
  CHECK_FALSE(parse_protection(dom.xml()));
  dom.remove_metadata(kProtectionNs, true, true);  // removing nothing is fine

  // An inactive domain has nothing live to change.
  dom.destroy();
  CHECK_FALSE(dom.active());
  CHECK(dom.state().str() == "shutoff (destroyed)");
  CHECK_THROWS_WITH(dom.set_metadata(protection_element(p), kProtectionPrefix, kProtectionNs, true,
                                     false),
                    Catch::Contains("not running"));
  dom.set_metadata(protection_element(p), kProtectionPrefix, kProtectionNs, true, true);
  CHECK(parse_protection(*dom.metadata(kProtectionNs))->epoch_ms == 10);
}

TEST_CASE("define, create_paused, resume, destroy, undefine on test:///default", "[libvirt]") {
  auto conn = lv::Connection::open("test:///default");
  std::string xml = lv::Domain::lookup(conn, "test").xml(true);
  TwinXmlOptions o;
  o.name = "ftvm-unit-twin";
  o.uuid = "generate";
  o.disk_files["/guest/diskimage1"] = "/guest/replica.raw";
  std::string txml = twin_xml(xml, o);

  // The test driver cannot start a domain paused (libvirt 9.0: "unsupported flags (0x1) in
  // function testDomainCreateXML"); the QEMU driver can. The error carries libvirt's message.
  CHECK_THROWS_WITH(lv::create_paused(conn, txml),
                    Catch::Contains("cannot start a paused transient domain") &&
                        Catch::Contains("unsupported flags"));
  CHECK_THROWS_AS(lv::Domain::lookup(conn, "ftvm-unit-twin"), lv::NoSuchDomain);

  // Persistent definition.
  o.name = "ftvm-unit-defined";
  auto def = lv::define(conn, twin_xml(xml, o));
  CHECK(def.persistent());
  CHECK_FALSE(def.active());
  CHECK(def.state().state == "shutoff");
  CHECK(lv::Domain::lookup(conn, "ftvm-unit-defined").uuid() == def.uuid());
  CHECK(disk_sources(def.xml()) == std::vector<std::string>{"/guest/replica.raw"});
  CHECK_THROWS_WITH(def.resume(), Catch::Contains("libvirt domain ftvm-unit-defined (test:///default): cannot resume"));
  CHECK_THROWS_WITH(def.qemu_pid(), Catch::Contains("not a QEMU connection"));
  // Metadata of an inactive persistent domain: config only.
  CHECK_THROWS_WITH(def.set_metadata(protection_element(Protection{"h"}), kProtectionPrefix, kProtectionNs,
                                     true, false),
                    Catch::Contains("not running"));
  def.set_metadata(protection_element(Protection{"h"}), kProtectionPrefix, kProtectionNs, true, true);
  CHECK(parse_protection(def.xml(true))->peer == "h");
  def.undefine();
  CHECK_THROWS_AS(lv::Domain::lookup(conn, "ftvm-unit-defined"), lv::NoSuchDomain);

  CHECK_THROWS_WITH(lv::create_paused(conn, "<domain type='test'><name>bad</name>"),
                    Catch::Contains("cannot start a paused transient domain"));
}

TEST_CASE("Connection::open reports libvirt's error and a hint", "[libvirt]") {
  // What a stopped libvirtd looks like: its socket is missing.
  std::string e = error_of([] { lv::Connection::open("qemu+unix:///system?socket=/nonexistent/libvirt-sock"); });
  CHECK(contains(e, "cannot connect to 'qemu+unix:///system?socket=/nonexistent/libvirt-sock'"));
  CHECK(contains(e, "/nonexistent/libvirt-sock"));
  CHECK(contains(e, "is libvirtd running? start it with `virtlogd -d; libvirtd -d`"));
  e = error_of([] { lv::Connection::open("bogus-driver:///x"); });
  CHECK(contains(e, "cannot connect"));
}

TEST_CASE("twin_xml with the standby's policy accepts a real libvirt domain", "[libvirt][security]") {
  // The domain above (qcow2 disk with a backing chain, CD-ROM, pty serial, guest-agent channel,
  // network interface, apparmor seclabel) as a standby with --allow-path /var/lib/libvirt/images
  // receives it.
  const TwinPolicy policy{{"/usr/bin/qemu-system-x86_64"}, "/run/ftvm/vms/ft1", "/var/lib/ftvm/disks/ft1",
                          {"/var/lib/libvirt/images"}};
  TwinXmlOptions o;
  o.disk_files["/var/lib/libvirt/images/ft1.qcow2"] = "/var/lib/ftvm/disks/ft1/0.img";
  o.socket_dir = policy.run_dir;
  o.policy = &policy;
  o.extra_qemu_args = {"-incoming", "defer", "-global", "migration.send-configuration=off"};
  std::string t = twin_xml(kDomainXml, o);
  INFO(t);
  CHECK(contains(t, "<emulator>/usr/bin/qemu-system-x86_64</emulator>"));
  CHECK(contains(t, "/run/ftvm/vms/ft1/org.qemu.guest_agent.0"));
  CHECK(contains(t, "<seclabel type=\"dynamic\""));  // left to libvirt
  // Without --allow-path for the CD-ROM's directory: refused, naming it.
  const TwinPolicy strict{{"/usr/bin/qemu-system-x86_64"}, "/run/ftvm/vms/ft1", "/var/lib/ftvm/disks/ft1", {}};
  o.policy = &strict;
  CHECK(contains(error_of([&] { twin_xml(kDomainXml, o); }), "seed.iso"));
}

TEST_CASE("protection element: peer-alt round-trips and is validated", "[libvirt]") {
  ftvm::vmm::Protection p;
  p.peer = "10.0.0.2:7410";
  p.peer_alt = "10.1.0.2:7410";
  const auto el = ftvm::vmm::protection_element(p);
  REQUIRE(el.find("peer-alt=\"10.1.0.2:7410\"") != std::string::npos);
  auto back = ftvm::vmm::parse_protection(el);
  REQUIRE(back);
  REQUIRE(back->peer_alt == "10.1.0.2:7410");
  p.peer_alt = "10.1.0.2;rm -rf /";
  REQUIRE_THROWS_WITH(ftvm::vmm::protection_element(p), Catch::Contains("peer-alt="));
}
