#include "common/error.h"

#include <cstring>

namespace ftvm {

SysError::SysError(int err, const std::string& what, const std::string& hint)
    : Error(hint.empty() ? fmt::format("{}: {}", what, std::strerror(err))
                         : fmt::format("{}: {} ({})", what, std::strerror(err), hint)),
      err_(err) {}

}  // namespace ftvm
