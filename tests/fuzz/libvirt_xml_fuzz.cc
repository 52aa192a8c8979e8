// Fuzz target: the libvirt domain XML functions (vmm-glue/libvirt_xml.h) on hostile XML, as a
// standby receives it in OpenSession: parse_protection, prepare_check/prepare_fix, disk_sources
// and twin_xml with the standby's policy. Each returns or throws ftvm::Error; nothing else.
#include <cstdint>
#include <string>

#include "common/error.h"
#include "vmm-glue/libvirt_xml.h"

using namespace ftvm::vmm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string xml(reinterpret_cast<const char*>(data), size);
  try {
    (void)parse_protection(xml);
  } catch (const ftvm::Error&) {
  }
  try {
    (void)prepare_check(xml);
    auto fixed = prepare_fix(xml);
    (void)prepare_check(fixed);
  } catch (const ftvm::Error&) {
  }
  try {
    (void)disk_sources(xml);
  } catch (const ftvm::Error&) {
  }
  static const TwinPolicy policy{{"/usr/bin/qemu-system-x86_64"}, "/run/ftvm/vms/x", "/var/lib/ftvm/disks/x",
                                 {"/var/lib/ftvm/images"}};
  TwinXmlOptions o;
  o.name = "twin";
  o.uuid = "generate";
  o.socket_dir = "/run/ftvm/vms/x";
  o.policy = &policy;
  o.extra_qemu_args = {"-incoming", "defer"};
  try {
    (void)twin_xml(xml, o);
  } catch (const ftvm::Error&) {
  }
  (void)looks_like_uuid(xml);
  return 0;
}
