#include "vmm-glue/qemu_cmdline.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <utility>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/error.h"

namespace ftvm::vmm {

namespace {

// Options QEMU 7.2 declares without HAS_ARG (qemu-options.def); every other option takes the
// next argument. An unknown option is assumed to take one, which is what QEMU does for the
// options it knows and the safest guess for the ones it may add.
const std::set<std::string>& no_arg_options() {
  static const std::set<std::string> s = {
      "S",          "daemonize",     "enable-kvm",     "enable-sync-profile", "full-screen",
      "mem-prealloc", "no-acpi",     "no-fd-bootchk",  "no-hpet",             "no-reboot",
      "no-shutdown", "no-user-config", "nodefaults",   "nographic",           "only-migratable",
      "portrait",   "s",             "singlestep",     "snapshot",            "usb",
      "version",    "win2k-hack",    "xen-attach",     "xen-domid-restrict",  "preconfig",
      "audio-help", "h",             "help",           "curses",              "sdl",
      "alt-grab",   "ctrl-grab",     "semihosting",    "no-quit",
  };
  return s;
}

// One element of argv after argv[0]: an option (with its value when it takes one) or a bare
// argument (legacy -hda image).
struct Opt {
  std::string prefix;  // "-" or "--"; empty for a bare argument
  std::string name;    // without dashes; the whole token for a bare argument
  std::optional<std::string> value;

  bool is(std::string_view n) const { return !prefix.empty() && name == n; }
  void emit(std::vector<std::string>& out) const {
    out.push_back(prefix + name);
    if (value) out.push_back(*value);
  }
};

std::vector<Opt> parse_argv(const std::vector<std::string>& argv) {
  if (argv.empty()) fail("QEMU command line is empty: expected the binary followed by options");
  std::vector<Opt> opts;
  for (size_t i = 1; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    Opt o;
    if (a.size() > 1 && a[0] == '-') {
      size_t n = (a.size() > 2 && a[1] == '-') ? 2 : 1;
      o.prefix = a.substr(0, n);
      o.name = a.substr(n);
      if (!no_arg_options().count(o.name)) {
        if (i + 1 >= argv.size())
          fail("QEMU option {} has no value: the command line ends after it (check how it was "
               "read from /proc/PID/cmdline)",
               a);
        o.value = argv[++i];
      }
    } else {
      o.name = a;
    }
    opts.push_back(std::move(o));
  }
  return opts;
}

// An option value in QEMU keyval syntax or (when it starts with '{') JSON syntax. `implied` is
// the key QEMU gives a leading item without '=' (e.g. "qom-type" for -object). Serialising keeps
// the original syntax, and keyval items keep their order and spelling.
class OptValue {
 public:
  OptValue(const std::string& text, const std::string& implied, const std::string& option)
      : implied_(implied) {
    size_t first = text.find_first_not_of(" \t\n");
    if (first != std::string::npos && text[first] == '{') {
      json_ = true;
      try {
        obj_ = nlohmann::json::parse(text);
      } catch (const nlohmann::json::exception& e) {
        fail("QEMU option -{} has malformed JSON value '{}': {} (fix the command line)", option,
             text, e.what());
      }
      if (!obj_.is_object())
        fail("QEMU option -{} value '{}' is JSON but not an object", option, text);
      return;
    }
    bool first_item = true;
    for (auto& item : split_keyval(text)) {
      size_t eq = item.find('=');
      if (eq == std::string::npos) {
        if (first_item && !implied.empty())
          items_.push_back({implied, item, Form::Implied});
        else
          items_.push_back({item, "on", Form::Bare});
      } else {
        items_.push_back({item.substr(0, eq), item.substr(eq + 1), Form::Full});
      }
      first_item = false;
    }
  }

  bool is_json() const { return json_; }

  // The value of a top-level key as QEMU would read it: JSON booleans as "on"/"off", numbers
  // and strings as their text; nested objects as their JSON text.
  std::optional<std::string> get(const std::string& key) const {
    if (json_) {
      auto it = obj_.find(key);
      if (it == obj_.end()) return std::nullopt;
      if (it->is_boolean()) return it->get<bool>() ? "on" : "off";
      if (it->is_string()) return it->get<std::string>();
      return it->dump();
    }
    std::optional<std::string> v;
    for (auto& it : items_)
      if (it.key == key) v = it.val;  // QEMU: the last occurrence wins
    return v;
  }
  bool get_bool(const std::string& key) const {
    auto v = get(key);
    return v && qemu_bool(*v);
  }
  std::vector<std::string> keys() const {
    std::vector<std::string> k;
    if (json_)
      for (auto& [key, val] : obj_.items()) k.push_back(key);
    else
      for (auto& it : items_) k.push_back(it.key);
    return k;
  }
  // Replaces the value of an existing string key (every occurrence).
  void set(const std::string& key, const std::string& val) {
    if (json_) {
      obj_[key] = val;
      return;
    }
    for (auto& it : items_)
      if (it.key == key) {
        it.val = val;
        if (it.form == Form::Bare) it.form = Form::Full;
      }
  }
  // Sets `key` to `val`, appending it when absent.
  void put(const std::string& key, const std::string& val) {
    if (get(key) || json_) {
      set(key, val);
      return;
    }
    items_.push_back({key, val, Form::Full});
  }
  // Removes every top-level key for which keep(key) is false.
  template <typename Keep>
  void retain(Keep keep) {
    if (json_) {
      for (auto it = obj_.begin(); it != obj_.end();) it = keep(it.key()) ? std::next(it) : obj_.erase(it);
      return;
    }
    std::erase_if(items_, [&](const Item& it) { return it.form != Form::Implied && !keep(it.key); });
  }
  nlohmann::json* json_object() { return json_ ? &obj_ : nullptr; }
  std::string str() const {
    if (json_) return obj_.dump();
    std::vector<std::string> parts;
    for (auto& it : items_) {
      switch (it.form) {
        case Form::Implied: parts.push_back(it.val); break;
        case Form::Bare: parts.push_back(it.key); break;
        case Form::Full: parts.push_back(it.key + "=" + it.val); break;
      }
    }
    return join_keyval(parts);
  }

 private:
  enum class Form { Implied, Bare, Full };
  struct Item {
    std::string key, val;
    Form form;
  };
  std::string implied_;
  bool json_ = false;
  nlohmann::json obj_;
  std::vector<Item> items_;
};

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

bool starts_with(const std::string& s, std::string_view p) { return s.rfind(p, 0) == 0; }

const char* kMemfdHint =
    "use -object memory-backend-memfd,id=mem0,size=<RAM size>,share=on -machine "
    "memory-backend=mem0 (libvirt: <memoryBacking><source type='memfd'/><access "
    "mode='shared'/></memoryBacking>)";

}  // namespace

std::vector<std::string> split_keyval(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == ',') {
      if (i + 1 < s.size() && s[i + 1] == ',') {
        cur += ',';
        ++i;
        continue;
      }
      out.push_back(std::move(cur));
      cur.clear();
      continue;
    }
    cur += s[i];
  }
  out.push_back(std::move(cur));
  return out;
}

std::string join_keyval(const std::vector<std::string>& items) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) out += ',';
    for (char c : items[i]) {
      out += c;
      if (c == ',') out += ',';
    }
  }
  return out;
}

bool qemu_bool(const std::string& v) {
  std::string l = lower(v);
  return l == "on" || l == "yes" || l == "true" || l == "y";
}

std::vector<std::string> check_protectable(const std::vector<std::string>& argv, bool incoming_completed) {
  std::vector<std::string> problems;
  auto opts = parse_argv(argv);

  struct Backend {
    std::string id, type;
    bool share = false, hugetlb = false;
  };
  std::map<std::string, Backend> backends;
  std::vector<std::string> backend_order;
  std::optional<std::string> machine_backend;
  std::vector<std::string> numa_memdevs;
  bool numa_legacy_mem = false;

  for (const Opt& o : opts) {
    if (!o.value) {
      continue;
    }
    const std::string& v = *o.value;
    if (o.is("object")) {
      OptValue ov(v, "qom-type", o.name);
      std::string type = ov.get("qom-type").value_or("");
      if (starts_with(type, "memory-backend-")) {
        Backend b;
        b.id = ov.get("id").value_or("");
        b.type = type;
        b.share = ov.get_bool("share");
        b.hugetlb = ov.get_bool("hugetlb");
        backends[b.id] = b;
        backend_order.push_back(b.id);
      }
    } else if (o.is("machine") || o.is("M")) {
      OptValue ov(v, "type", o.name);
      if (auto mb = ov.get("memory-backend")) machine_backend = *mb;
    } else if (o.is("numa")) {
      OptValue ov(v, "type", o.name);
      if (ov.get("type").value_or("node") == "node") {
        if (auto md = ov.get("memdev"))
          numa_memdevs.push_back(*md);
        else if (ov.get("mem"))
          numa_legacy_mem = true;
      }
    } else if (o.is("mem-path")) {
      problems.push_back(fmt::format(
          "-mem-path {}: guest RAM backed by a file is not supported (ftd finds and maps guest "
          "RAM through a shared memfd); remove -mem-path and {}",
          v, kMemfdHint));
    } else if (o.is("incoming") && !incoming_completed) {
      problems.push_back(fmt::format(
          "-incoming {}: this QEMU is a migration target waiting for its state, not a running "
          "guest; protect the VM after the migration completed (on the host it runs on)",
          v));
    } else if (o.is("device")) {
      OptValue ov(v, "driver", o.name);
      std::string drv = ov.get("driver").value_or("");
      std::string id = ov.get("id").value_or("");
      std::string what = id.empty() ? fmt::format("-device {}", drv)
                                    : fmt::format("-device {} (id {})", drv, id);
      if (drv.find("balloon") != std::string::npos) {
        problems.push_back(fmt::format(
            "{}: memory ballooning is not supported: inflating the balloon (and free page "
            "reporting) discards guest pages with MADV_DONTNEED/fallocate(PUNCH_HOLE), which the "
            "dirty trackers do not see, so the standby would diverge; remove the balloon "
            "(libvirt: <memballoon model='none'/>)",
            what));
      } else if (starts_with(drv, "virtio-mem")) {
        problems.push_back(fmt::format(
            "{}: virtio-mem is not supported: it plugs and unplugs guest RAM by discarding pages, "
            "which the dirty trackers do not see; remove the device and size the main RAM "
            "backend instead",
            what));
      } else if (starts_with(drv, "vhost-user")) {
        problems.push_back(fmt::format(
            "{}: vhost-user devices are not supported: the backend process writes guest RAM "
            "directly and its writes are not tracked; use the QEMU-emulated device instead",
            what));
      } else if (starts_with(drv, "vhost-")) {
        problems.push_back(fmt::format(
            "{}: in-kernel vhost devices are not supported: writes by vhost worker threads are "
            "not tracked (not verified); use an emulated device instead",
            what));
      } else if (starts_with(drv, "vfio")) {
        problems.push_back(fmt::format(
            "{}: device assignment is not supported: the device writes guest RAM by DMA, which "
            "the dirty trackers do not see, and its state cannot be checkpointed; remove it",
            what));
      } else if (auto md = ov.get("memdev")) {
        problems.push_back(fmt::format(
            "{} uses memory backend '{}': only the machine's main RAM backend is replicated, "
            "RAM or shared memory of devices (pc-dimm, nvdimm, virtio-pmem, ivshmem) is not; "
            "remove the device",
            what, *md));
      }
    } else if (o.is("netdev") || o.is("nic") || o.is("net")) {
      OptValue ov(v, "type", o.name);
      std::string type = ov.get("type").value_or("");
      std::string id = ov.get("id").value_or("");
      std::string what = fmt::format("-{} {}{}", o.name, type, id.empty() ? "" : " (id " + id + ")");
      if (type == "vhost-user" || type == "vhost-vdpa") {
        std::string chr = ov.get("chardev").value_or("");
        problems.push_back(fmt::format(
            "{}{}: {} networking is not supported: another process writes guest RAM and its "
            "writes are not tracked; use -netdev tap with vhost=off",
            what, chr.empty() ? "" : fmt::format(" over -chardev {}", chr), type));
      } else if (ov.get_bool("vhost") || ov.get_bool("vhostforce") || ov.get("vhostfd") ||
                 ov.get("vhostfds")) {
        problems.push_back(fmt::format(
            "{}: vhost-net is not supported: packets are written into guest RAM by vhost kernel "
            "threads and those writes are not verified to be tracked; set vhost=off (libvirt: "
            "<driver name='qemu'/> in the <interface>)",
            what));
      }
    }
  }

  // The main RAM backend.
  std::optional<std::string> main_id;
  if (machine_backend) {
    main_id = machine_backend;
  } else if (numa_memdevs.size() == 1) {
    main_id = numa_memdevs[0];
  }
  if (numa_memdevs.size() > 1) {
    problems.push_back(fmt::format(
        "-numa node,memdev=: the guest has {} NUMA memory backends ({}); ftvm replicates exactly "
        "one RAM backend for now: use a single NUMA node with one memory-backend-memfd",
        numa_memdevs.size(), fmt::join(numa_memdevs, ", ")));
  } else if (backend_order.size() > 1) {
    problems.push_back(fmt::format(
        "-object memory-backend-*: the command line defines {} RAM backends ({}); ftvm "
        "replicates exactly one (the machine's memory-backend): remove the others",
        backend_order.size(), fmt::join(backend_order, ", ")));
  }
  if (numa_memdevs.size() > 1) {
    // Already reported: there is no single main backend to check.
  } else if (!main_id) {
    problems.push_back(fmt::format(
        "guest RAM: {} is not a shared memfd backend, so ftd cannot map it from outside QEMU; {}",
        numa_legacy_mem ? "-numa node,mem= RAM" : "anonymous RAM from -m", kMemfdHint));
  } else if (!backends.count(*main_id)) {
    problems.push_back(fmt::format(
        "-machine memory-backend={}: no -object memory-backend-* with id '{}' on the command "
        "line; {}",
        *main_id, *main_id, kMemfdHint));
  } else {
    const Backend& b = backends[*main_id];
    if (b.type != "memory-backend-memfd") {
      problems.push_back(fmt::format(
          "-object {},id={}: the main RAM backend must be memory-backend-memfd ({} cannot be "
          "mapped and tracked from outside QEMU the way ftd does); {}",
          b.type, b.id, b.type, kMemfdHint));
    } else {
      if (!b.share)
        problems.push_back(fmt::format(
            "-object memory-backend-memfd,id={}: share=on is required (with share=off QEMU's "
            "RAM is a private copy-on-write mapping that ftd cannot see through the memfd); add "
            "share=on",
            b.id));
      if (b.hugetlb)
        problems.push_back(fmt::format(
            "-object memory-backend-memfd,id={}: hugetlb=on is not supported (dirty tracking and "
            "copying would work on whole 2 MiB/1 GiB pages and soft-dirty does not cover "
            "hugetlb); remove hugetlb=on",
            b.id));
    }
  }
  return problems;
}

std::vector<std::string> make_twin_cmdline(const std::vector<std::string>& argv,
                                           const TwinOptions& t) {
  if (t.run_dir.empty() || t.qmp_socket.empty())
    fail("make_twin_cmdline: run_dir and qmp_socket must be set (caller bug)");
  auto opts = parse_argv(argv);

  // Chardevs used by monitors go with the monitors.
  std::set<std::string> monitor_chardevs;
  for (const Opt& o : opts) {
    if (!o.value) continue;
    if (o.is("mon")) {
      OptValue ov(*o.value, "chardev", o.name);
      if (auto c = ov.get("chardev")) monitor_chardevs.insert(*c);
    } else if ((o.is("monitor") || o.is("qmp") || o.is("qmp-pretty")) &&
               starts_with(*o.value, "chardev:")) {
      monitor_chardevs.insert(o.value->substr(8));
    }
  }

  std::set<std::string> used_paths;
  std::string run_dir = t.run_dir;
  while (run_dir.size() > 1 && run_dir.back() == '/') run_dir.pop_back();
  auto relocate = [&](const std::string& path) {
    std::string base = path.substr(path.find_last_of('/') + 1);
    if (base.empty()) base = "file";
    std::string candidate = run_dir + "/" + base;
    for (int k = 1; used_paths.count(candidate); ++k)
      candidate = fmt::format("{}/{}.{}", run_dir, base, k);
    used_paths.insert(candidate);
    return candidate;
  };
  // Legacy chardev specs (-serial, -parallel, -monitor, -virtioconsole, ...): unix:PATH[,opts],
  // file:PATH, pipe:PATH.
  auto relocate_legacy = [&](const std::string& spec) -> std::string {
    if (starts_with(spec, "unix:")) {
      auto items = split_keyval(spec.substr(5));
      items[0] = relocate(items[0]);
      return "unix:" + join_keyval(items);
    }
    if (starts_with(spec, "file:")) return "file:" + relocate(spec.substr(5));
    if (starts_with(spec, "pipe:")) return "pipe:" + relocate(spec.substr(5));
    return spec;
  };
  auto check_no_fd = [&](const Opt& o, const OptValue& ov) {
    for (const char* k : {"fd", "fds", "vhostfd", "vhostfds"})
      if (auto f = ov.get(k))
        fail("-{} {}: uses file descriptor {}={} inherited from the process that started QEMU; "
             "the twin cannot be given the same descriptor: create the twin of a libvirt-managed "
             "VM through libvirt, or use a path/ifname instead of fd=",
             o.name, *o.value, k, *f);
  };

  // Disks: the primary's image path -> the twin's raw image. The twin's copy is raw whatever
  // the primary's format (the mirror copies guest-visible bytes), so the format layer above a
  // rewritten file becomes raw too.
  std::set<std::string> disks_found;
  std::set<std::string> rewritten_file_nodes;  // -blockdev driver=file nodes given a twin image
  auto twin_disk = [&](const std::string& path) -> const std::string* {
    auto it = t.disk_files.find(path);
    if (it == t.disk_files.end()) return nullptr;
    disks_found.insert(path);
    return &it->second;
  };
  auto keep_for_raw = [](const std::string& k) {
    for (const char* p : {"driver", "node-name", "file", "read-only", "auto-read-only", "force-share", "discard",
                          "detect-zeroes", "cache"})
      if (k == p || starts_with(k, std::string(p) + ".")) return true;
    return false;
  };
  for (const Opt& o : opts) {
    if (!o.is("blockdev") || !o.value) continue;
    OptValue ov(*o.value, "driver", o.name);
    if (ov.get("driver").value_or("") != "file") continue;
    auto fn = ov.get("filename");
    auto nn = ov.get("node-name");
    if (fn && nn && t.disk_files.count(*fn)) rewritten_file_nodes.insert(*nn);
  }

  std::vector<std::string> out{argv[0]};
  for (const Opt& o : opts) {
    if (o.prefix.empty()) {
      if (auto d = twin_disk(o.name)) {
        out.push_back(*d);
        continue;
      }
      o.emit(out);
      continue;
    }
    if (o.is("daemonize") || o.is("pidfile") || o.is("qmp") || o.is("qmp-pretty") ||
        o.is("mon") || o.is("incoming") || o.is("loadvm") || o.is("S") || o.is("preconfig"))
      continue;
    if (o.is("monitor")) {
      if (o.value == "none") o.emit(out);
      continue;
    }
    if (!o.value) {
      o.emit(out);
      continue;
    }
    Opt n = o;
    std::string& v = *n.value;
    if (v.find("/dev/fdset/") != std::string::npos || o.is("add-fd"))
      fail("-{} {}: refers to a file descriptor set passed by the process that started QEMU; "
           "the twin cannot be given the same descriptors: create the twin of a libvirt-managed "
           "VM through libvirt",
           o.name, v);
    if (o.is("chardev")) {
      OptValue ov(v, "backend", o.name);
      if (ov.is_json())
        fail("-chardev {}: JSON chardev syntax is not supported for twins yet; write it as "
             "keyval (backend,id=...,path=...)",
             v);
      std::string id = ov.get("id").value_or("");
      if (monitor_chardevs.count(id)) continue;
      check_no_fd(o, ov);
      std::string backend = ov.get("backend").value_or("");
      // serial/tty/parallel/parport path= names a host device, not a file QEMU creates.
      if ((backend == "socket" || backend == "file" || backend == "pipe") && ov.get("path"))
        ov.set("path", relocate(*ov.get("path")));
      if (auto lf = ov.get("logfile")) ov.set("logfile", relocate(*lf));
      v = ov.str();
    } else if (o.is("serial") || o.is("parallel") || o.is("virtioconsole") ||
               o.is("debugcon")) {
      v = relocate_legacy(v);
    } else if (o.is("D")) {
      v = relocate(v);
    } else if (o.is("trace")) {
      OptValue ov(v, "enable", o.name);
      if (auto f = ov.get("file")) {
        ov.set("file", relocate(*f));
        v = ov.str();
      }
    } else if (o.is("vnc")) {
      if (starts_with(v, "unix:")) {
        auto items = split_keyval(v.substr(5));
        items[0] = relocate(items[0]);
        v = "unix:" + join_keyval(items);
      }
    } else if (o.is("drive")) {
      OptValue ov(v, "", o.name);
      if (auto f = ov.get("file")) {
        if (auto d = twin_disk(*f)) {
          ov.set("file", *d);
          ov.put("format", "raw");
          v = ov.str();
        }
      }
    } else if (o.is("hda") || o.is("hdb") || o.is("hdc") || o.is("hdd") || o.is("sd") || o.is("mtdblock") ||
               o.is("pflash")) {
      if (auto d = twin_disk(v)) v = *d;
    } else if (o.is("blockdev")) {
      OptValue ov(v, "driver", o.name);
      const std::string drv = ov.get("driver").value_or("");
      if (auto* j = ov.json_object()) {
        // JSON: the file node may be nested under "file" (format node over a file node).
        nlohmann::json* file = j;
        if (j->contains("file") && (*j)["file"].is_object()) file = &(*j)["file"];
        // (a "driver" that is not a string is no file node; never nlohmann's type_error: the
        // peer's bytes are untrusted, twin_cmdline_fuzz found it)
        const auto fd = file->find("driver");
        const bool file_node = fd != file->end() && fd->is_string() && fd->get<std::string>() == "file";
        if (file_node && file->contains("filename") && (*file)["filename"].is_string()) {
          if (auto d = twin_disk((*file)["filename"].get<std::string>())) {
            (*file)["filename"] = *d;
            if (file != j) {
              ov.retain(keep_for_raw);
              (*j)["driver"] = "raw";
            }
          }
        } else if (j->contains("file") && (*j)["file"].is_string() &&
                   rewritten_file_nodes.count((*j)["file"].get<std::string>())) {
          ov.retain(keep_for_raw);
          (*j)["driver"] = "raw";
        }
        v = ov.str();
      } else if (drv == "file" && ov.get("filename")) {
        if (auto d = twin_disk(*ov.get("filename"))) {
          ov.set("filename", *d);
          v = ov.str();
        }
      } else if (ov.get("file.driver").value_or("") == "file" && ov.get("file.filename")) {
        if (auto d = twin_disk(*ov.get("file.filename"))) {
          ov.set("file.filename", *d);
          ov.retain(keep_for_raw);
          ov.set("driver", "raw");
          v = ov.str();
        }
      } else if (auto f = ov.get("file"); f && rewritten_file_nodes.count(*f) && drv != "raw") {
        ov.retain(keep_for_raw);
        ov.set("driver", "raw");
        v = ov.str();
      }
    } else if (o.is("name")) {
      OptValue ov(v, "guest", o.name);
      if (auto g = ov.get("guest")) ov.set("guest", *g + t.name_suffix);
      if (auto p = ov.get("process")) ov.set("process", *p + t.name_suffix);
      v = ov.str();
    } else if (o.is("netdev") || o.is("nic") || o.is("net")) {
      OptValue ov(v, "type", o.name);
      check_no_fd(o, ov);
      if (o.is("netdev") && ov.get("type").value_or("") == "tap") {
        if (auto ifn = ov.get("ifname")) {
          auto it = t.tap_ifnames.find(*ifn);
          if (it != t.tap_ifnames.end()) {
            ov.set("ifname", it->second);
            v = ov.str();
          }
        }
      }
    }
    n.emit(out);
  }
  for (const auto& [path, twin] : t.disk_files)
    if (!disks_found.count(path))
      fail("the disk image {} that QEMU reports is not named on its command line (-drive file=, -blockdev "
           "filename=, -hda ...), so the twin cannot be given its replica {}: start the VM with the image path on "
           "the command line", path, twin);
  out.insert(out.end(), {"-S", "-incoming", "defer", "-global", "migration.send-configuration=off",
                         "-qmp", "unix:" + join_keyval({t.qmp_socket}) + ",server=on,wait=off"});
  return out;
}


// ---- twin policy --------------------------------------------------------------------------------

namespace {

std::string basename_of(const std::string& p) {
  auto s = p.find_last_of('/');
  return s == std::string::npos ? p : p.substr(s + 1);
}

bool lexically_inside(const std::string& path, std::string dir) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  if (dir.empty()) return false;
  if (dir == "/") return path.size() > 1;
  return path.size() > dir.size() + 1 && path.compare(0, dir.size(), dir) == 0 && path[dir.size()] == '/';
}

// Where a path named on the twin's command line may lie.
enum class Use {
  Create,    // QEMU creates or writes it (sockets, logs, chardev files): the run dir only
  Read,      // QEMU only reads it (kernel, firmware, ROMs): read dirs, run dir, disk dir
  Disk,      // a writable disk: the replica dir only
  DiskRead,  // a read-only disk or CD-ROM: read dirs or the replica dir
};

class PolicyChecker {
 public:
  explicit PolicyChecker(const TwinPolicy& p) : p_(p) {}
  std::vector<std::string> problems;

  void refuse(const std::string& what, const std::string& why) {
    problems.push_back(fmt::format("{}: {}", what, why));
  }

  void path(const std::string& what, const std::string& value, Use use) {
    std::vector<std::string> dirs;
    const char* where = "";
    switch (use) {
      case Use::Create:
        dirs = {p_.run_dir};
        where = "the twin's run directory";
        break;
      case Use::Read:
        dirs = p_.read_dirs;
        dirs.push_back(p_.run_dir);
        dirs.push_back(p_.disk_dir);
        where = "a directory allowed with ftd --allow-path (or the twin's run/replica directory)";
        break;
      case Use::Disk:
        dirs = {p_.disk_dir};
        where = "the twin's replica directory (writable disks must be replicated disks)";
        break;
      case Use::DiskRead:
        dirs = p_.read_dirs;
        dirs.push_back(p_.disk_dir);
        where = "a directory allowed with ftd --allow-path (or the twin's replica directory)";
        break;
    }
    if (!path_inside(value, dirs))
      refuse(what, fmt::format("the path '{}' is not inside {}; the standby refuses to let the primary name files "
                               "on this host (add its directory with ftd --allow-path on the standby if it is a "
                               "read-only input such as a kernel, firmware or image)",
                               value, where));
  }

  // Keys that name files, whatever the option; checked wherever they occur.
  void generic_keys(const std::string& what, const OptValue& ov, Use use) {
    for (const auto& k : ov.keys()) {
      auto v = ov.get(k).value_or("");
      if (k == "romfile" || k == "file" || k == "filename" || k == "logfile" || k == "path" || k == "kernel" ||
          k == "initrd" || k == "dtb" || k == "firmware" || k == "bios") {
        if (k == "romfile" && v.empty()) continue;  // romfile= (no ROM)
        path(fmt::format("{} {}=", what, k), v, (k == "logfile" || k == "path") ? Use::Create : use);
      } else if (k == "script" || k == "downscript") {
        if (v != "no")
          refuse(fmt::format("{} {}={}", what, k, v),
                 "the primary may not name a program for the standby to run; use script=no,downscript=no");
      } else if (k == "helper" || k == "dumpdtb" || k == "mem-path" || k == "smb" || k == "guestfwd" ||
                 k == "sock_fd" || k == "fd" || k == "fds" || k == "vhostfd" || k == "vhostfds") {
        refuse(fmt::format("{} {}=", what, k),
               "this setting runs a program, writes or exports a host file, or takes a file descriptor, and is not "
               "allowed on a twin");
      }
    }
  }

  void check(const std::vector<std::string>& argv) {
    if (argv.empty()) {
      refuse("twin command line", "empty");
      return;
    }
    if (std::find(p_.qemu_binaries.begin(), p_.qemu_binaries.end(), argv[0]) == p_.qemu_binaries.end())
      refuse(fmt::format("binary {}", argv[0]),
             fmt::format("not one of the QEMU binaries this standby runs ({}); allow it with ftd --qemu-binary",
                         p_.qemu_binaries.empty() ? "none" : fmt::format("{}", fmt::join(p_.qemu_binaries, ", "))));
    std::vector<Opt> opts;
    try {
      opts = parse_argv(argv);
    } catch (const std::exception& e) {
      refuse("twin command line", e.what());
      return;
    }
    for (const Opt& o : opts) {
      try {
        option(o);
      } catch (const std::exception& e) {
        refuse(fmt::format("-{}", o.name), e.what());
      }
    }
  }

 private:
  const TwinPolicy& p_;

  void legacy_chardev(const std::string& what, const std::string& v) {
    if (v == "none" || v == "null" || v == "pty" || v == "stdio" || starts_with(v, "chardev:")) return;
    if (starts_with(v, "unix:")) {
      auto items = split_keyval(v.substr(5));
      path(what, items.empty() ? "" : items[0], Use::Create);
      return;
    }
    if (starts_with(v, "file:")) {
      path(what, v.substr(5), Use::Create);
      return;
    }
    refuse(what + " " + v, "only none, null, pty, stdio, chardev:ID, unix:PATH and file:PATH (in the twin's run "
                           "directory) are allowed on a twin");
  }

  void blockdev_json(const std::string& what, const nlohmann::json& j, bool ro) {
    if (!j.is_object()) return;
    if (j.contains("read-only") && j["read-only"].is_boolean() && j["read-only"].get<bool>()) ro = true;
    for (auto& [k, v] : j.items()) {
      if (k == "driver") {
        std::string d = v.is_string() ? v.get<std::string>() : v.dump();
        if (d != "file" && d != "raw" && d != "qcow2")
          refuse(fmt::format("{} driver {}", what, d), "only the file, raw and qcow2 block drivers are allowed on a "
                                                       "twin (no network or host-device block backends)");
      } else if (k == "filename") {
        path(what + " filename=", v.is_string() ? v.get<std::string>() : v.dump(), ro ? Use::DiskRead : Use::Disk);
      } else if (v.is_object()) {
        blockdev_json(what, v, ro);
      }
    }
  }

  void option(const Opt& o) {
    const std::string what = "-" + o.name;
    if (o.prefix.empty()) {  // legacy -hda image
      path(fmt::format("disk image argument {}", o.name), o.name, Use::Disk);
      return;
    }
    static const std::set<std::string> plain = {"S", "enable-kvm", "nodefaults", "nographic", "no-user-config",
                                                "no-reboot", "no-shutdown", "no-hpet", "no-acpi", "mem-prealloc",
                                                "usb", "only-migratable", "no-fd-bootchk"};
    static const std::set<std::string> free_text = {"m", "smp", "cpu", "name", "uuid", "rtc", "k", "vga",
                                                    "append", "overcommit", "msg", "action", "watchdog-action",
                                                    "numa", "d"};
    if (!o.value) {
      if (!plain.count(o.name))
        refuse(what, "not on the standby's allow-list of QEMU options for twins (see docs/ARCHITECTURE.md, "
                     "\"Security\")");
      return;
    }
    const std::string& v = *o.value;
    if (free_text.count(o.name)) return;
    if (o.name == "boot") {
      OptValue ov(v, "order", o.name);
      if (auto sp = ov.get("splash")) path(what + " splash=", *sp, Use::Read);
    } else if (o.name == "machine" || o.name == "M") {
      generic_keys(what, OptValue(v, "type", o.name), Use::Read);
    } else if (o.name == "accel") {
      OptValue ov(v, "accel", o.name);
      auto a = ov.get("accel").value_or("");
      if (a != "kvm" && a != "tcg") refuse(what + " " + a, "only kvm and tcg are allowed");
      generic_keys(what, ov, Use::Read);
    } else if (o.name == "kernel" || o.name == "initrd" || o.name == "dtb" || o.name == "bios" ||
               o.name == "L" || o.name == "option-rom") {
      path(what, v, Use::Read);
    } else if (o.name == "cdrom") {
      path(what, v, Use::DiskRead);
    } else if (o.name == "hda" || o.name == "hdb" || o.name == "hdc" || o.name == "hdd" || o.name == "sd" ||
               o.name == "mtdblock" || o.name == "pflash" || o.name == "fda" || o.name == "fdb") {
      path(what, v, Use::Disk);
    } else if (o.name == "D") {
      path(what, v, Use::Create);
    } else if (o.name == "trace") {
      OptValue ov(v, "enable", o.name);
      if (auto f = ov.get("file")) path(what + " file=", *f, Use::Create);
      if (auto f = ov.get("events")) path(what + " events=", *f, Use::Read);
    } else if (o.name == "display") {
      if (OptValue(v, "type", o.name).get("type").value_or("") != "none")
        refuse(what + " " + v, "only -display none is allowed on a twin (it runs headless on the standby)");
    } else if (o.name == "vnc") {
      if (v == "none") return;
      if (!starts_with(v, "unix:")) {
        refuse(what + " " + v, "only -vnc none or -vnc unix:PATH in the twin's run directory are allowed");
        return;
      }
      auto items = split_keyval(v.substr(5));
      path(what, items.empty() ? "" : items[0], Use::Create);
    } else if (o.name == "serial" || o.name == "parallel" || o.name == "debugcon" || o.name == "virtioconsole") {
      legacy_chardev(what, v);
    } else if (o.name == "chardev") {
      OptValue ov(v, "backend", o.name);
      auto b = ov.get("backend").value_or("");
      static const std::set<std::string> ok = {"socket", "file", "null", "pty", "stdio", "ringbuf", "memory"};
      if (!ok.count(b)) {
        refuse(what + " " + b, "only socket, file, null, pty, stdio and ringbuf chardevs are allowed on a twin");
        return;
      }
      if (b == "socket" && !ov.get("path"))
        refuse(what + " socket", "only unix sockets (path=, in the twin's run directory) are allowed on a twin, "
                                 "not TCP/UDP endpoints");
      if (b == "file" && !ov.get("path")) refuse(what + " file", "file chardev without path=");
      generic_keys(what, ov, Use::Create);
    } else if (o.name == "device") {
      OptValue ov(v, "driver", o.name);
      auto d = ov.get("driver").value_or("");
      for (const char* bad : {"vfio", "vhost", "usb-host", "ivshmem", "pci-assign", "xen", "u2f-passthru",
                              "virtio-9p", "vfio-user", "tpm-", "pr-manager"})
        if (starts_with(d, bad))
          refuse(what + " " + d, "devices that pass host devices, host memory or host files to the guest, or "
                                 "need another process, are not allowed on a twin");
      generic_keys(what + " " + d, ov, Use::Read);
    } else if (o.name == "drive") {
      OptValue ov(v, "", o.name);
      static const std::set<std::string> ok = {"file", "if", "bus", "unit", "index", "media", "cache", "aio",
                                               "format", "readonly", "rerror", "werror", "id", "node-name",
                                               "discard", "detect-zeroes", "serial", "cache.direct",
                                               "cache.no-flush", "copy-on-read"};
      for (const auto& k : ov.keys())
        if (!ok.count(k) && !starts_with(k, "throttling."))
          refuse(fmt::format("{} {}=", what, k), "not an allowed -drive setting on a twin (no protocol or driver "
                                                 "options: the twin opens local image files only)");
      const bool ro = ov.get_bool("readonly") || ov.get("media").value_or("") == "cdrom";
      auto fmt_ = ov.get("format");
      if (auto f = ov.get("file")) {
        path(what + " file=", *f, ro ? Use::DiskRead : Use::Disk);
        if (!fmt_ || (*fmt_ != "raw" && (*fmt_ != "qcow2" || !ro)))
          refuse(what + " " + *f, "a twin's disk needs an explicit format=raw (format=qcow2 for read-only "
                                  "images): probing a guest-written image is unsafe");
      }
    } else if (o.name == "blockdev") {
      OptValue ov(v, "driver", o.name);
      if (auto* j = ov.json_object()) {
        blockdev_json(what, *j, false);
      } else {
        const bool ro = ov.get_bool("read-only");
        for (const auto& k : ov.keys()) {
          auto val = ov.get(k).value_or("");
          if (k == "driver" || (k.size() > 7 && k.compare(k.size() - 7, 7, ".driver") == 0)) {
            if (val != "file" && val != "raw" && val != "qcow2")
              refuse(fmt::format("{} {}={}", what, k, val), "only the file, raw and qcow2 block drivers are allowed "
                                                            "on a twin");
          } else if (k == "filename" || (k.size() > 9 && k.compare(k.size() - 9, 9, ".filename") == 0)) {
            path(fmt::format("{} {}=", what, k), val, ro ? Use::DiskRead : Use::Disk);
          }
        }
      }
    } else if (o.name == "netdev" || o.name == "nic" || o.name == "net") {
      OptValue ov(v, "type", o.name);
      auto t = ov.get("type").value_or("");
      if (t != "tap" && t != "user" && t != "hubport" && t != "none" && !(o.name == "net" && t == "nic"))
        refuse(what + " " + t, "only tap, user and hubport network backends are allowed on a twin");
      if (auto tf = ov.get("tftp")) path(what + " tftp=", *tf, Use::Read);
      generic_keys(what + " " + t, ov, Use::Read);
    } else if (o.name == "object") {
      OptValue ov(v, "qom-type", o.name);
      auto t = ov.get("qom-type").value_or("");
      if (t == "rng-random") {
        auto f = ov.get("filename").value_or("/dev/urandom");
        if (f != "/dev/urandom" && f != "/dev/random" && f != "/dev/hwrng")
          refuse(what + " rng-random filename=" + f, "only /dev/urandom, /dev/random or /dev/hwrng");
        return;
      }
      static const std::set<std::string> ok = {"memory-backend-memfd", "rng-builtin", "iothread", "throttle-group"};
      if (!ok.count(t)) {
        refuse(what + " " + t, "only memory-backend-memfd, rng-builtin, rng-random, iothread and throttle-group "
                               "objects are allowed on a twin");
        return;
      }
      generic_keys(what + " " + t, ov, Use::Read);
    } else if (o.name == "global") {
      // driver.prop=value
      auto eq = v.find('=');
      auto key = v.substr(0, eq);
      auto prop = key.substr(key.find_last_of('.') + 1);
      auto val = eq == std::string::npos ? "" : v.substr(eq + 1);
      if (prop == "romfile" || prop == "file" || prop == "filename" || prop == "kernel" || prop == "initrd") {
        if (!(prop == "romfile" && val.empty())) path(what + " " + key, val, Use::Read);
      }
    } else if (o.name == "smbios" || o.name == "fw_cfg") {
      OptValue ov(v, o.name == "smbios" ? "type" : "", o.name);
      if (auto f = ov.get("file")) path(what + " file=", *f, Use::Read);
    } else if (o.name == "acpitable") {
      OptValue ov(v, "", o.name);
      for (const char* k : {"file", "data"})
        if (auto f = ov.get(k)) {
          size_t start = 0;
          for (;;) {
            auto c = f->find(':', start);
            path(fmt::format("{} {}=", what, k), f->substr(start, c - start), Use::Read);
            if (c == std::string::npos) break;
            start = c + 1;
          }
        }
    } else if (o.name == "sandbox") {
      auto items = split_keyval(v);
      if (items.empty() || !qemu_bool(items[0]))
        refuse(what + " " + v, "the twin may not run with the seccomp sandbox switched off");
    } else if (o.name == "audiodev") {
      if (OptValue(v, "driver", o.name).get("driver").value_or("") != "none")
        refuse(what + " " + v, "only -audiodev none is allowed on a twin");
    } else if (o.name == "qmp") {
      if (!starts_with(v, "unix:")) {
        refuse(what + " " + v, "only unix QMP sockets in the twin's run directory");
        return;
      }
      auto items = split_keyval(v.substr(5));
      path(what, items.empty() ? "" : items[0], Use::Create);
    } else if (o.name == "incoming") {
      if (v != "defer") refuse(what + " " + v, "the twin takes its state only from ftd (-incoming defer)");
    } else if (o.name == "monitor") {
      if (v != "none") refuse(what + " " + v, "the twin's only monitor is ftd's own QMP socket");
    } else {
      static const std::map<std::string, std::string> why = {
          {"plugin", "loads a shared library into QEMU"},
          {"add-fd", "passes file descriptors the standby does not have"},
          {"readconfig", "reads a configuration file of the primary's choice"},
          {"writeconfig", "writes a file of the primary's choice"},
          {"runas", "changes the user QEMU runs as"},
          {"run-with", "changes how QEMU runs (user, chroot, async teardown)"},
          {"chroot", "changes QEMU's root directory"},
          {"daemonize", "detaches QEMU from ftd"},
          {"pidfile", "writes a file of the primary's choice"},
          {"loadvm", "loads a snapshot instead of the replicated state"},
          {"fsdev", "exports a host directory to the guest"},
          {"virtfs", "exports a host directory to the guest"},
          {"mem-path", "maps a host file as guest RAM"},
          {"gdb", "opens a debugger port"},
          {"qtest", "opens a test control channel"},
          {"tpmdev", "passes a host TPM or starts an emulator"},
          {"spice", "opens a remote display port"},
          {"mon", "adds a monitor beyond ftd's own"},
          {"semihosting-config", "lets the guest reach host files"},
      };
      auto it = why.find(o.name);
      refuse(what, it != why.end() ? it->second + ": not allowed on a twin"
                                   : std::string("not on the standby's allow-list of QEMU options for twins (see "
                                                 "docs/ARCHITECTURE.md, \"Security\")"));
    }
  }
};

}  // namespace

bool path_inside(const std::string& path, const std::vector<std::string>& dirs) {
  if (path.empty() || path[0] != '/') return false;
  for (size_t start = 1; start <= path.size();) {
    size_t e = path.find('/', start);
    if (e == std::string::npos) e = path.size();
    std::string_view comp(path.data() + start, e - start);
    if (comp == "." || comp == "..") return false;
    start = e + 1;
  }
  std::error_code ec;
  const std::string real = std::filesystem::weakly_canonical(path, ec).string();
  if (ec) return false;
  for (const auto& d : dirs) {
    if (d.empty() || d[0] != '/') continue;
    if (!lexically_inside(path, d)) continue;
    std::error_code ec2;
    const std::string rd = std::filesystem::weakly_canonical(d, ec2).string();
    if (ec2) continue;
    if (lexically_inside(real, rd)) return true;
  }
  return false;
}

std::string pick_qemu_binary(const std::string& requested, const std::vector<std::string>& allowed) {
  if (allowed.empty())
    fail("this standby allows no QEMU binary (start ftd with --qemu-binary PATH)");
  if (requested.empty()) return allowed[0];
  const std::string want = basename_of(requested);
  for (const auto& a : allowed)
    if (basename_of(a) == want) return a;
  fail("the primary asks for QEMU binary '{}', but this standby runs only {} (ftd --qemu-binary); the standby never "
       "executes a binary the primary names: install that QEMU on the standby and allow it with --qemu-binary",
       requested, fmt::join(allowed, ", "));
}

std::vector<std::string> check_twin_cmdline(const std::vector<std::string>& argv, const TwinPolicy& policy) {
  PolicyChecker c(policy);
  c.check(argv);
  return std::move(c.problems);
}

}  // namespace ftvm::vmm
