// Fuzz target: the libvirt hook's parsers (tools/hook/ftvm_hook.cc): the domain XML libvirt
// passes on stdin (parse_domain, canonical_uuid) and /etc/ftvm/hook.conf (read_config). The
// hook's source is compiled into this target with its main() renamed. First byte: 0 = config,
// otherwise XML.
#include <sys/mman.h>
#include <unistd.h>

#define main ftvm_hook_main
#include "tools/hook/ftvm_hook.cc"
#undef main

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] == 0) {
    int fd = ::memfd_create("hook-conf", MFD_CLOEXEC);
    if (fd < 0) std::abort();
    if (!text.empty() && ::write(fd, text.data(), text.size()) != static_cast<ssize_t>(text.size())) std::abort();
    std::vector<std::string> warnings;
    (void)read_config("/proc/self/fd/" + std::to_string(fd), warnings);
    ::close(fd);
  } else {
    std::string why;
    if (auto d = parse_domain(text, why)) (void)canonical_uuid(d->uuid);
    (void)canonical_uuid(text);
    (void)clean(text);
  }
  return 0;
}
