// Parsing untrusted XML with libxml2 (and nothing else: no libvirt, no filesystem). Shared by
// the protection-element parser (protection_xml.h, linked by the libvirt hook) and the domain
// XML rewriting of libvirt_xml.h.
#pragma once

#include <libxml/tree.h>

#include <memory>
#include <string>

#include "common/error.h"

namespace ftvm::vmm::xml {

struct DocFree {
  void operator()(xmlDoc* d) const { xmlFreeDoc(d); }
};
using DocPtr = std::unique_ptr<xmlDoc, DocFree>;

// The input is not well-formed XML (or is empty, or too large for libxml2). what() is the whole
// message ("WHAT: malformed XML at line N: DETAIL (pass the output of `virsh dumpxml`
// unchanged)"); line (0 when unknown) and detail (libxml2's own message, trailing whitespace
// removed; empty for the empty/too-large cases) let a caller word it its own way.
class MalformedXml : public Error {
 public:
  MalformedXml(const std::string& what, int line, std::string detail)
      : Error(what), line_(line), detail_(std::move(detail)) {}
  int line() const noexcept { return line_; }
  const std::string& detail() const noexcept { return detail_; }

 private:
  int line_;
  std::string detail_;
};

// Parses `xml` as data: no network, no DTD loading, no entity substitution, libxml2's own error
// printing off. `what` names the document in messages ("domain XML"). Returns a document with a
// root element; throws MalformedXml when `xml` is empty or blank, larger than INT_MAX bytes, or
// not well-formed, and ftvm::Error when libxml2 cannot allocate. Thread-safe (libxml2 is
// initialised once).
DocPtr parse(const std::string& xml, const char* what);

}  // namespace ftvm::vmm::xml
