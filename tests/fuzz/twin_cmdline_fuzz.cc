// Fuzz target: the QEMU command-line functions the standby applies to the argv a primary sends
// (vmm-glue/qemu_cmdline.h): check_protectable, make_twin_cmdline, pick_qemu_binary and
// check_twin_cmdline. Input: NUL-separated arguments. Each returns or throws ftvm::Error; a twin
// command line that passes the policy never names the peer's binary or a forbidden option.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/error.h"
#include "vmm-glue/qemu_cmdline.h"

using namespace ftvm::vmm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> argv(1);
  for (size_t i = 0; i < size && argv.size() < 256; i++) {
    if (data[i] == 0) argv.emplace_back();
    else argv.back() += static_cast<char>(data[i]);
  }
  try {
    (void)check_protectable(argv);
  } catch (const ftvm::Error&) {
  }
  static const TwinPolicy policy{{"/usr/bin/qemu-system-x86_64"}, "/run/ftvm/vms/x", "/var/lib/ftvm/disks/x",
                                 {"/var/lib/ftvm/images"}};
  TwinOptions t;
  t.run_dir = "/run/ftvm/vms/x";
  t.qmp_socket = "/run/ftvm/vms/x/twin-qmp.sock";
  t.tap_ifnames["tap0"] = "tap1";
  try {
    auto a = argv;
    a[0] = pick_qemu_binary(a[0], policy.qemu_binaries);
    auto twin = make_twin_cmdline(a, t);
    auto problems = check_twin_cmdline(twin, policy);
    if (problems.empty()) {
      if (twin[0] != "/usr/bin/qemu-system-x86_64") std::abort();
      for (const auto& x : twin)
        if (x == "-plugin" || x == "-readconfig" || x == "-add-fd" || x == "-fsdev" || x == "-runas") std::abort();
    }
  } catch (const ftvm::Error&) {
  }
  try {
    (void)check_twin_cmdline(argv, policy);
  } catch (const ftvm::Error&) {
    std::abort();  // documented never to throw
  }
  return 0;
}
