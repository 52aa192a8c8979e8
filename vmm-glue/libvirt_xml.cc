#include "vmm-glue/libvirt_xml.h"

#include <cctype>
#include <climits>
#include <cstring>
#include <memory>
#include <mutex>
#include <functional>
#include <set>

#include <fmt/format.h>
#include <libxml/parser.h>
#include <libxml/tree.h>

#include "common/error.h"
#include "vmm-glue/xml_doc.h"

namespace ftvm::vmm {

namespace {

constexpr const char* kQemuNs = "http://libvirt.org/schemas/domain/qemu/1.0";

const xmlChar* X(const char* s) { return reinterpret_cast<const xmlChar*>(s); }
std::string S(const xmlChar* s) { return s ? reinterpret_cast<const char*>(s) : ""; }

using xml::DocPtr;

// Parses `xml`; `what` names the document in errors ("domain XML").
DocPtr parse(const std::string& xml, const char* what) { return xml::parse(xml, what); }

bool is_elem(xmlNode* n) { return n && n->type == XML_ELEMENT_NODE; }
// An element of libvirt's own (unnamespaced) vocabulary.
bool is_elem(xmlNode* n, const char* name) {
  return is_elem(n) && n->ns == nullptr && S(n->name) == name;
}
bool in_ns(xmlNode* n, const char* href, const char* name) {
  return is_elem(n) && n->ns && n->ns->href && S(n->ns->href) == href && S(n->name) == name;
}

xmlNode* child(xmlNode* parent, const char* name) {
  if (!parent) return nullptr;
  for (xmlNode* c = parent->children; c; c = c->next)
    if (is_elem(c, name)) return c;
  return nullptr;
}
std::vector<xmlNode*> children(xmlNode* parent, const char* name) {
  std::vector<xmlNode*> out;
  if (!parent) return out;
  for (xmlNode* c = parent->children; c; c = c->next)
    if (is_elem(c, name)) out.push_back(c);
  return out;
}

std::optional<std::string> attr(xmlNode* n, const char* name) {
  if (!n) return std::nullopt;
  xmlChar* v = xmlGetNoNsProp(n, X(name));
  if (!v) return std::nullopt;
  std::string s = S(v);
  xmlFree(v);
  return s;
}
std::string attr_or(xmlNode* n, const char* name, const std::string& dflt = "") {
  return attr(n, name).value_or(dflt);
}
void set_attr(xmlNode* n, const char* name, const std::string& v) {
  if (!xmlSetProp(n, X(name), X(v.c_str())))
    fail("XML: cannot set attribute {}='{}' (out of memory)", name, v);
}

bool is_blank_text(xmlNode* n) {
  if (!n || n->type != XML_TEXT_NODE) return false;
  std::string s = S(n->content);
  return s.find_first_not_of(" \t\r\n") == std::string::npos;
}

// The indentation of `n` (what follows the last newline of the blank text before it).
std::string indent_of(xmlNode* n) {
  if (!is_blank_text(n->prev)) return "";
  std::string s = S(n->prev->content);
  size_t nl = s.rfind('\n');
  return nl == std::string::npos ? "" : s.substr(nl + 1);
}

xmlNode* new_text(xmlDoc* doc, const std::string& s) {
  xmlNode* t = xmlNewDocText(doc, X(s.c_str()));
  if (!t) fail("XML: out of memory");
  return t;
}

// Makes the whitespace just before `elem` exactly `ws` (no text node merging surprises).
void ensure_ws_before(xmlNode* elem, const std::string& ws) {
  if (is_blank_text(elem->prev))
    xmlNodeSetContent(elem->prev, X(ws.c_str()));
  else if (!elem->prev || elem->prev->type != XML_TEXT_NODE)
    xmlAddPrevSibling(elem, new_text(elem->doc, ws));
}

xmlNode* new_elem(xmlDoc* doc, const char* name, xmlNs* ns = nullptr) {
  xmlNode* n = xmlNewDocNode(doc, ns, X(name), nullptr);
  if (!n) fail("XML: out of memory");
  return n;
}

// Appends `elem` as the last element child of `parent`, indented like its siblings.
void append_child(xmlNode* parent, xmlNode* elem) {
  xmlNode* first_elem = nullptr;
  for (xmlNode* c = parent->children; c && !first_elem; c = c->next)
    if (is_elem(c)) first_elem = c;
  std::string ind = first_elem ? indent_of(first_elem) : indent_of(parent) + "  ";
  xmlNode* last = parent->last;
  if (last && is_blank_text(last)) {
    xmlAddPrevSibling(last, elem);
  } else {
    xmlAddChild(parent, elem);
    if (!last) xmlAddNextSibling(elem, new_text(parent->doc, "\n" + indent_of(parent)));
  }
  ensure_ws_before(elem, "\n" + ind);
}

// Inserts `elem` right after its future sibling `ref`, same indentation.
void insert_after(xmlNode* ref, xmlNode* elem) {
  xmlAddNextSibling(ref, elem);
  ensure_ws_before(elem, "\n" + indent_of(ref));
}

// Removes `n` and the indentation before it.
void remove_node(xmlNode* n) {
  if (is_blank_text(n->prev)) {
    xmlNode* p = n->prev;
    xmlUnlinkNode(p);
    xmlFreeNode(p);
  }
  xmlUnlinkNode(n);
  xmlFreeNode(n);
}

void remove_children(xmlNode* n) {
  while (n->children) {
    xmlNode* c = n->children;
    xmlUnlinkNode(c);
    xmlFreeNode(c);
  }
}

std::string serialize(xmlDoc* doc) {
  std::unique_ptr<xmlBuffer, void (*)(xmlBuffer*)> buf(xmlBufferCreate(), xmlBufferFree);
  if (!buf) fail("XML: out of memory");
  if (xmlNodeDump(buf.get(), doc, xmlDocGetRootElement(doc), 0, 0) < 0)
    fail("XML: cannot serialise the domain XML");
  std::string out(reinterpret_cast<const char*>(xmlBufferContent(buf.get())),
                  static_cast<size_t>(xmlBufferLength(buf.get())));
  out += '\n';
  return out;
}

xmlNode* domain_root(xmlDoc* doc, const char* what) {
  xmlNode* root = xmlDocGetRootElement(doc);
  if (!is_elem(root, "domain"))
    fail("{}: root element is <{}>, expected <domain> (pass the output of `virsh dumpxml`)", what,
         S(root->name));
  return root;
}

// ---- prepare ------------------------------------------------------------------------------------

std::string describe_nic(xmlNode* nic, size_t index) {
  std::string type = attr_or(nic, "type", "?");
  if (auto mac = attr(child(nic, "mac"), "address")) return fmt::format("<interface type='{}'> with mac {}", type, *mac);
  if (auto dev = attr(child(nic, "target"), "dev")) return fmt::format("<interface type='{}'> {}", type, *dev);
  return fmt::format("<interface type='{}'> #{}", type, index + 1);
}

std::string describe_disk(xmlNode* disk) {
  std::string target = attr_or(child(disk, "target"), "dev", "?");
  xmlNode* src = child(disk, "source");
  std::string from;
  for (const char* k : {"file", "dev", "name", "pool", "volume", "dir", "path"})
    if (auto v = attr(src, k)) {
      from = fmt::format(" (source {}='{}')", k, *v);
      break;
    }
  return fmt::format("disk {}{}", target, from);
}

bool disk_writable(xmlNode* disk) {
  return attr_or(disk, "device", "disk") != "cdrom" && !child(disk, "readonly");
}

// Finds the issues of `root`; with `fix`, also fixes the fixable ones in place.
std::vector<PrepareIssue> analyze(xmlNode* root, bool fix) {
  std::vector<PrepareIssue> out;
  auto issue = [&](std::string what, std::string fixs, bool fixable) {
    out.push_back(PrepareIssue{std::move(what), std::move(fixs), true, fixable});
  };
  xmlDoc* doc = root->doc;

  // Guest RAM: a shared memfd, no hugepages.
  xmlNode* mb = child(root, "memoryBacking");
  xmlNode* src = child(mb, "source");
  xmlNode* acc = child(mb, "access");
  std::string src_type = attr_or(src, "type", "anonymous");
  std::string mode = attr_or(acc, "mode", "private");
  if (src_type != "memfd" || mode != "shared") {
    issue(fmt::format("guest RAM is not a shared memfd (memoryBacking source type '{}', access "
                      "mode '{}'): ftd maps the guest RAM from outside QEMU through the memfd",
                      src_type, mode),
          "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>", true);
    if (fix) {
      if (!mb) {
        mb = new_elem(doc, "memoryBacking");
        xmlNode* after = child(root, "currentMemory");
        if (!after) after = child(root, "memory");
        if (after) insert_after(after, mb);
        else append_child(root, mb);
      }
      if (!src) append_child(mb, src = new_elem(doc, "source"));
      set_attr(src, "type", "memfd");
      if (!acc) append_child(mb, acc = new_elem(doc, "access"));
      set_attr(acc, "mode", "shared");
    }
  }
  if (xmlNode* hp = child(mb, "hugepages")) {
    issue("guest RAM uses hugepages (<memoryBacking><hugepages>): dirty tracking and copying would "
          "work at huge-page granularity and soft-dirty does not cover hugetlb",
          "remove <hugepages>...</hugepages> from <memoryBacking>", true);
    if (fix) remove_node(hp);
  }
  std::vector<xmlNode*> cells = children(child(child(root, "cpu"), "numa"), "cell");
  if (cells.size() > 1)
    issue(fmt::format("{} NUMA cells in <cpu><numa>: libvirt gives each its own RAM backend and "
                      "ftd replicates only one",
                      cells.size()),
          "use a single <cell> (or remove <numa>); not changed automatically", false);
  for (xmlNode* cell : cells)
    if (auto ma = attr(cell, "memAccess"); ma && *ma != "shared") {
      issue(fmt::format("NUMA <cell id='{}' memAccess='{}'> overrides the shared memory access",
                        attr_or(cell, "id", "?"), *ma),
            "memAccess='shared' on that <cell>", true);
      if (fix) set_attr(cell, "memAccess", "shared");
    }

  xmlNode* devices = child(root, "devices");

  // The balloon.
  std::vector<xmlNode*> balloons = children(devices, "memballoon");
  if (balloons.empty()) {
    issue("no <memballoon> element: libvirt then adds a virtio balloon, and a balloon (free-page "
          "reporting included) discards guest pages the dirty trackers cannot see",
          "<memballoon model='none'/> in <devices>", true);
    if (fix) {
      if (!devices) append_child(root, devices = new_elem(doc, "devices"));
      xmlNode* b = new_elem(doc, "memballoon");
      set_attr(b, "model", "none");
      append_child(devices, b);
    }
  }
  for (xmlNode* b : balloons) {
    std::string model = attr_or(b, "model", "?");
    if (model == "none") continue;
    issue(fmt::format("<memballoon model='{}'>: a balloon (free-page reporting included) discards "
                      "guest pages the dirty trackers cannot see",
                      model),
          "<memballoon model='none'/> (replacing the whole element)", true);
    if (fix) {
      remove_children(b);
      while (b->properties) xmlRemoveProp(b->properties);
      set_attr(b, "model", "none");
    }
  }

  // Network interfaces.
  std::vector<xmlNode*> nics = children(devices, "interface");
  for (size_t i = 0; i < nics.size(); ++i) {
    xmlNode* nic = nics[i];
    std::string type = attr_or(nic, "type");
    std::string what = describe_nic(nic, i);
    const char* emulated =
        "use an emulated NIC instead: <interface type='network'> or type='bridge' with "
        "<model type='virtio'/> and <driver name='qemu'/>; not changed automatically";
    if (type == "vhostuser" || type == "vdpa") {
      issue(fmt::format("{}: a {} backend writes guest RAM directly, outside QEMU", what,
                        type == "vdpa" ? "vhost-vDPA" : "vhost-user"),
            emulated, false);
      continue;
    }
    if (type == "hostdev") {
      issue(fmt::format("{}: an assigned (VFIO) device writes guest RAM by DMA", what), emulated,
            false);
      continue;
    }
    std::string model = attr_or(child(nic, "model"), "type");
    bool vhost_capable = type == "network" || type == "bridge" || type == "ethernet" ||
                         type == "direct";
    if (model.rfind("virtio", 0) != 0 || !vhost_capable) continue;
    xmlNode* drv = child(nic, "driver");
    std::string name = attr_or(drv, "name", "(default: vhost)");
    if (name == "qemu") continue;
    issue(fmt::format("{} model {} uses in-kernel vhost (driver name {}): writes by vhost worker "
                      "threads are not tracked",
                      what, model, name),
          "<driver name='qemu'/> in that <interface>", true);
    if (fix) {
      if (!drv) append_child(nic, drv = new_elem(doc, "driver"));
      set_attr(drv, "name", "qemu");
    }
  }

  // Disks.
  for (xmlNode* disk : children(devices, "disk")) {
    std::string type = attr_or(disk, "type", "file");
    if (type == "vhostuser" || type == "vhostvdpa") {
      issue(fmt::format("{} is type='{}': another process writes guest RAM directly",
                        describe_disk(disk), type),
            "use a local image file (<disk type='file'>) on an emulated controller; not changed "
            "automatically",
            false);
      continue;
    }
    if (disk_writable(disk) && type != "file")
      issue(fmt::format("writable {} is type='{}': ftd mirrors only local image files", describe_disk(disk),
                        type),
            "use a local image file (<disk type='file' device='disk'><source file='/path/to/image'/>) "
            "or mark the disk <readonly/>; not changed automatically",
            false);
  }

  // Devices that write guest RAM from elsewhere, or add RAM that is not replicated.
  for (xmlNode* fs : children(devices, "filesystem"))
    if (attr_or(child(fs, "driver"), "type") == "virtiofs")
      issue(fmt::format("<filesystem> {} uses virtiofs: virtiofsd (vhost-user) writes guest RAM "
                        "directly",
                        attr_or(child(fs, "target"), "dir", "?")),
            "remove the <filesystem> (or use a 9p <driver type='path'/>); not changed "
            "automatically",
            false);
  for (xmlNode* v : children(devices, "video"))
    if (attr_or(child(v, "driver"), "name") == "vhostuser")
      issue("<video> with <driver name='vhostuser'>: a vhost-user GPU process writes guest RAM",
            "use an emulated video model without the vhostuser driver; not changed automatically",
            false);
  for (xmlNode* h : children(devices, "hostdev"))
    issue(fmt::format("<hostdev type='{}'>: an assigned host device writes guest RAM by DMA (or "
                      "through in-kernel vhost-scsi)",
                      attr_or(h, "type", "?")),
          "remove the <hostdev>; not changed automatically", false);
  if (!children(devices, "vsock").empty())
    issue("<vsock>: vhost-vsock in the kernel writes guest RAM outside QEMU",
          "remove the <vsock> device; not changed automatically", false);
  for (xmlNode* s : children(devices, "shmem"))
    issue(fmt::format("<shmem name='{}'>: shared memory that is not replicated",
                      attr_or(s, "name", "?")),
          "remove the <shmem> device; not changed automatically", false);
  for (xmlNode* m : children(devices, "memory"))
    issue(fmt::format("<memory model='{}'> device: RAM outside the main memfd is not replicated "
                      "(and virtio-mem discards pages the trackers cannot see)",
                      attr_or(m, "model", "?")),
          "remove the <memory> device (grow <memory> instead); not changed automatically", false);
  return out;
}

// TwinXmlOptions::socket_dir.
void relocate_files(xmlNode* root, std::string dir) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  std::map<std::string, std::string> moved;  // original -> new
  std::set<std::string> taken;
  auto relocate = [&](const std::string& path) {
    if (auto it = moved.find(path); it != moved.end()) return it->second;
    std::string base = path.substr(path.find_last_of('/') + 1);
    if (base.empty()) base = "file";
    std::string candidate = dir + "/" + base;
    for (int k = 1; taken.count(candidate); ++k) candidate = fmt::format("{}/{}.{}", dir, base, k);
    taken.insert(candidate);
    moved[path] = candidate;
    return candidate;
  };
  auto chardev = [&](xmlNode* e) {
    std::string type = attr_or(e, "type");
    for (xmlNode* src : children(e, "source")) {
      auto path = attr(src, "path");
      if (!path || path->empty()) continue;
      if ((type == "unix" && attr_or(src, "mode") == "bind") || type == "file")
        set_attr(src, "path", relocate(*path));
    }
    for (xmlNode* log : children(e, "log"))
      if (auto f = attr(log, "file"); f && !f->empty()) set_attr(log, "file", relocate(*f));
  };
  xmlNode* devices = child(root, "devices");
  for (const char* kind : {"serial", "parallel", "console", "channel", "redirdev", "smartcard"})
    for (xmlNode* e : children(devices, kind)) chardev(e);
  for (xmlNode* rng : children(devices, "rng"))
    for (xmlNode* be : children(rng, "backend")) chardev(be);
  for (xmlNode* g : children(devices, "graphics")) {
    if (auto s = attr(g, "socket"); s && !s->empty()) set_attr(g, "socket", relocate(*s));
    for (xmlNode* l : children(g, "listen"))
      if (auto s = attr(l, "socket"); attr_or(l, "type") == "socket" && s && !s->empty())
        set_attr(l, "socket", relocate(*s));
  }
}


// The text content of `n`, surrounding whitespace removed.
std::string content(xmlNode* n) {
  xmlChar* c = xmlNodeGetContent(n);
  std::string t = S(c);
  xmlFree(c);
  const auto b = t.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return t.substr(b, t.find_last_not_of(" \t\r\n") - b + 1);
}

// The standby's policy on a twin's XML (see TwinXmlOptions::policy). `root` is the rewritten
// domain; `ftd_args` are the <qemu:arg> values ftd adds itself (tolerated in the input).
std::vector<std::string> policy_problems(xmlNode* root, const TwinPolicy& p, const std::string& run_dir) {
  std::vector<std::string> out;
  auto inside = [&](const std::string& path, std::vector<std::string> dirs) { return path_inside(path, dirs); };
  std::vector<std::string> read_dirs = p.read_dirs;
  read_dirs.push_back(p.disk_dir);
  read_dirs.push_back(run_dir);
  auto need = [&](const std::string& what, const std::string& path, const std::vector<std::string>& dirs,
                  const char* where) {
    if (!inside(path, dirs))
      out.push_back(fmt::format("{}: the path '{}' is not inside {}; the standby refuses to let the primary name "
                                "files on this host (add its directory with ftd --allow-path on the standby if it is "
                                "a read-only input)",
                                what, path, where));
  };
  const char* kRead = "a directory allowed with ftd --allow-path";
  // <os>
  if (xmlNode* os = child(root, "os")) {
    for (const char* k : {"kernel", "initrd", "dtb", "loader"})
      for (xmlNode* e : children(os, k)) {
        const std::string t = content(e);
        if (!t.empty()) need(fmt::format("<os><{}>", k), t, read_dirs, kRead);
      }
    for (xmlNode* e : children(os, "nvram")) {
      if (auto tp = attr(e, "template")) need("<os><nvram template=>", *tp, read_dirs, kRead);
      const std::string t = content(e);
      if (!t.empty()) need("<os><nvram>", t, {run_dir}, "the twin's run directory (libvirt writes it)");
    }
    if (xmlNode* acpi = child(os, "acpi"))
      for (xmlNode* t : children(acpi, "table")) {
        need("<os><acpi><table>", content(t), read_dirs, kRead);
      }
  }
  for (xmlNode* si : children(root, "sysinfo"))
    for (xmlNode* e : children(si, "entry"))
      if (auto f = attr(e, "file")) need("<sysinfo><entry file=>", *f, read_dirs, kRead);
  xmlNode* devices = child(root, "devices");
  // Disks.
  std::function<void(xmlNode*, const std::string&)> backing = [&](xmlNode* d, const std::string& what) {
    for (xmlNode* bs : children(d, "backingStore")) {
      if (auto f = attr(child(bs, "source"), "file")) need(what + " <backingStore>", *f, read_dirs, kRead);
      else if (child(bs, "source"))
        out.push_back(what + " <backingStore>: only file backing stores are allowed on a twin");
      backing(bs, what);
    }
  };
  for (xmlNode* disk : children(devices, "disk")) {
    const std::string what = describe_disk(disk);
    const std::string type = attr_or(disk, "type", "file");
    xmlNode* src = child(disk, "source");
    if (type != "file") {
      if (src)
        out.push_back(fmt::format("{} is type='{}': a twin opens only local image files (no block devices, network "
                                  "or directory disks)",
                                  what, type));
      continue;
    }
    if (auto f = attr(src, "file")) {
      if (disk_writable(disk))
        need(what, *f, {p.disk_dir}, "the twin's replica directory (writable disks must be replicated disks)");
      else
        need(what, *f, read_dirs, kRead);
    }
    backing(disk, what);
  }
  // Chardevs.
  auto chardev = [&](xmlNode* e, const std::string& what) {
    const std::string type = attr_or(e, "type");
    static const std::set<std::string> ok = {"pty", "null", "unix", "file", "spicevmc", "spiceport", "qemu-vdagent"};
    if (!ok.count(type)) {
      out.push_back(fmt::format("<{} type='{}'>: only pty, null, spicevmc, spiceport, qemu-vdagent, and unix or file "
                                "in the twin's run directory are allowed on a twin",
                                what, type));
      return;
    }
    for (xmlNode* src : children(e, "source"))
      if (auto path = attr(src, "path"); path && (type == "unix" || type == "file"))
        need(fmt::format("<{} type='{}'> source", what, type), *path, {run_dir},
             "the twin's run directory (sockets the twin connects to must be ftd's)");
    for (xmlNode* log : children(e, "log"))
      if (auto f = attr(log, "file")) need(fmt::format("<{}> <log file=>", what), *f, {run_dir}, "the twin's run directory");
  };
  for (const char* kind : {"serial", "parallel", "console", "channel", "redirdev", "smartcard"})
    for (xmlNode* e : children(devices, kind)) {
      if (std::string(kind) == "smartcard" && attr_or(e, "mode") != "passthrough") continue;
      chardev(e, kind);
    }
  for (xmlNode* rng : children(devices, "rng"))
    for (xmlNode* be : children(rng, "backend")) {
      if (attr_or(be, "model") == "random") {
        const std::string v = content(be);
        if (!v.empty() && v != "/dev/urandom" && v != "/dev/random" && v != "/dev/hwrng")
          out.push_back(fmt::format("<rng><backend model='random'>{}: only /dev/urandom, /dev/random or /dev/hwrng",
                                    v));
      } else {
        chardev(be, "rng backend");
      }
    }
  for (xmlNode* i : children(devices, "interface")) {
    const std::string type = attr_or(i, "type");
    if (type == "vhostuser" || type == "vdpa" || type == "hostdev" || type == "server" || type == "client" ||
        type == "mcast" || type == "udp")
      out.push_back(fmt::format("<interface type='{}'>: not allowed on a twin (host devices, other processes or "
                                "network sockets of the primary's choice)",
                                type));
    if (child(i, "script") || child(i, "downscript"))
      out.push_back("<interface> <script>/<downscript>: the primary may not name a program for the standby to run");
    if (xmlNode* b = child(i, "backend"); b && (attr(b, "tap") || attr(b, "vhost")))
      out.push_back("<interface> <backend tap=/vhost=>: the twin opens only the standard host devices");
  }
  for (xmlNode* dev = devices ? devices->children : nullptr; dev; dev = dev->next) {
    if (!is_elem(dev)) continue;
    for (xmlNode* rom : children(dev, "rom"))
      if (auto f = attr(rom, "file"); f && !f->empty()) need(fmt::format("<{}><rom file=>", S(dev->name)), *f, read_dirs, kRead);
  }
  for (const char* bad : {"hostdev", "filesystem", "shmem"})
    if (!children(devices, bad).empty())
      out.push_back(fmt::format("<{}>: passes host devices, host directories or host memory to the guest; not allowed "
                                "on a twin",
                                bad));
  for (xmlNode* in : children(devices, "input"))
    if (attr_or(in, "type") == "passthrough" || attr_or(in, "type") == "evdev")
      out.push_back(fmt::format("<input type='{}'>: passes a host input device; not allowed on a twin",
                                attr_or(in, "type")));
  for (xmlNode* tpm : children(devices, "tpm"))
    if (attr_or(child(tpm, "backend"), "type") == "passthrough")
      out.push_back("<tpm><backend type='passthrough'>: passes the host's TPM; not allowed on a twin");
  for (xmlNode* m : children(devices, "memory"))
    if (xmlNode* src = child(m, "source"); src && child(src, "path"))
      out.push_back("<memory><source><path>: maps a host file as guest memory; not allowed on a twin");
  return out;
}
}  // namespace

std::vector<PrepareIssue> prepare_check(const std::string& domain_xml) {
  DocPtr doc = parse(domain_xml, "domain XML");
  return analyze(domain_root(doc.get(), "domain XML"), false);
}

std::string prepare_fix(const std::string& domain_xml) {
  DocPtr doc = parse(domain_xml, "domain XML");
  analyze(domain_root(doc.get(), "domain XML"), true);
  return serialize(doc.get());
}

std::string twin_xml(const std::string& domain_xml, const TwinXmlOptions& opts) {
  DocPtr doc = parse(domain_xml, "domain XML");
  xmlNode* root = domain_root(doc.get(), "domain XML");
  xmlDoc* d = doc.get();

  xmlUnsetProp(root, X("id"));  // live-only

  xmlNode* name = child(root, "name");
  if (!opts.name.empty()) {
    if (!name) fail("domain XML: no <name> element (pass the output of `virsh dumpxml`)");
    remove_children(name);
    xmlAddChild(name, new_text(d, opts.name));
  }
  xmlNode* uuid = child(root, "uuid");
  if (opts.uuid == "generate") {
    if (uuid) remove_node(uuid);
  } else if (!opts.uuid.empty()) {
    if (!looks_like_uuid(opts.uuid))
      fail("twin XML: uuid '{}' is not a UUID (use 8-4-4-4-12 hex digits, \"generate\" or \"\" to "
           "keep the primary's)",
           opts.uuid);
    if (!uuid) {
      uuid = new_elem(d, "uuid");
      if (name) insert_after(name, uuid);
      else append_child(root, uuid);
    }
    remove_children(uuid);
    xmlAddChild(uuid, new_text(d, opts.uuid));
  }

  std::set<std::string> used;
  for (xmlNode* disk : children(child(root, "devices"), "disk")) {
    xmlNode* src = child(disk, "source");
    auto file = attr(src, "file");
    if (!file) continue;
    auto it = opts.disk_files.find(*file);
    if (it == opts.disk_files.end()) continue;
    used.insert(*file);
    set_attr(src, "file", it->second);
    xmlNode* drv = child(disk, "driver");
    if (!drv) {
      drv = new_elem(d, "driver");
      set_attr(drv, "name", "qemu");
      append_child(disk, drv);
    }
    set_attr(drv, "type", "raw");
    for (xmlNode* bs : children(disk, "backingStore")) remove_node(bs);
  }
  for (const auto& [from, to] : opts.disk_files)
    if (!used.count(from))
      fail("twin XML: disk image '{}' (to be replaced by '{}') is not the <source file=...> of "
           "any <disk> in the domain XML; the twin would open the primary's image (name the "
           "files as `virsh domblklist` shows them)",
           from, to);

  if (!opts.socket_dir.empty()) relocate_files(root, opts.socket_dir);

  if (opts.policy) {
    std::vector<std::string> problems;
    if (opts.socket_dir.empty()) fail("twin XML: a policy needs socket_dir (caller bug)");
    // libvirt's raw QEMU passthrough: nothing of the primary's, only what ftd adds below.
    static const std::set<std::string> ftd_args = {"-incoming", "defer", "-global",
                                                   "migration.send-configuration=off"};
    for (xmlNode* c = root->children; c;) {
      xmlNode* next = c->next;
      if (is_elem(c) && c->ns && S(c->ns->href) == kQemuNs) {
        bool only_ftd = S(c->name) == "commandline";
        for (xmlNode* a = c->children; a && only_ftd; a = a->next)
          if (is_elem(a) && !(in_ns(a, kQemuNs, "arg") && ftd_args.count(attr_or(a, "value"))))
            only_ftd = false;
        if (only_ftd)
          remove_node(c);
        else
          problems.push_back(fmt::format("<qemu:{}>: raw QEMU arguments, environment or overrides from the primary "
                                         "are not allowed on a twin (ftd adds the only arguments the twin needs)",
                                         S(c->name)));
      }
      c = next;
    }
    for (auto& pr : policy_problems(root, *opts.policy, opts.socket_dir)) problems.push_back(pr);
    // The binary: the standby's own.
    xmlNode* devices = child(root, "devices");
    if (!devices) append_child(root, devices = new_elem(d, "devices"));
    xmlNode* emu = child(devices, "emulator");
    std::string requested;
    if (emu) requested = content(emu);
    try {
      const std::string bin = pick_qemu_binary(requested, opts.policy->qemu_binaries);
      if (!emu) {
        emu = new_elem(d, "emulator");
        append_child(devices, emu);
      }
      remove_children(emu);
      xmlAddChild(emu, new_text(d, bin));
    } catch (const Error& e) {
      problems.push_back(fmt::format("<emulator>: {}", e.what()));
    }
    if (!problems.empty())
      fail("refusing the twin's libvirt domain XML: it breaks this standby's policy (docs/ARCHITECTURE.md, "
           "\"Security\"): {}",
           fmt::join(problems, "; "));
  }

  if (xmlNode* md = child(root, "metadata")) {
    for (xmlNode* c = md->children; c;) {
      xmlNode* next = c->next;
      if (in_ns(c, kProtectionNs, "protection")) remove_node(c);
      c = next;
    }
    bool any = false;
    for (xmlNode* c = md->children; c; c = c->next) any = any || is_elem(c);
    if (!any) remove_node(md);
  }

  if (!opts.extra_qemu_args.empty()) {
    xmlNs* ns = xmlSearchNsByHref(d, root, X(kQemuNs));
    if (!ns) ns = xmlNewNs(root, X(kQemuNs), X("qemu"));
    if (!ns)
      fail("domain XML: cannot declare xmlns:qemu='{}' on <domain> (the prefix 'qemu' is bound to "
           "another namespace)",
           kQemuNs);
    xmlNode* cl = nullptr;
    for (xmlNode* c = root->children; c && !cl; c = c->next)
      if (in_ns(c, kQemuNs, "commandline")) cl = c;
    if (!cl) append_child(root, cl = new_elem(d, "commandline", ns));
    for (const auto& a : opts.extra_qemu_args) {
      xmlNode* arg = new_elem(d, "arg", ns);
      set_attr(arg, "value", a);
      append_child(cl, arg);
    }
  }
  return serialize(d);
}

std::vector<std::string> disk_sources(const std::string& domain_xml) {
  DocPtr doc = parse(domain_xml, "domain XML");
  xmlNode* root = domain_root(doc.get(), "domain XML");
  std::vector<std::string> out;
  for (xmlNode* disk : children(child(root, "devices"), "disk")) {
    if (attr_or(disk, "type", "file") != "file" || !disk_writable(disk)) continue;
    if (auto f = attr(child(disk, "source"), "file"); f && !f->empty()) out.push_back(*f);
  }
  return out;
}

}  // namespace ftvm::vmm
