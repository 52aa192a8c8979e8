#include "vmm-glue/xml_doc.h"

#include <climits>
#include <mutex>

#include <fmt/format.h>
#include <libxml/parser.h>

namespace ftvm::vmm::xml {

DocPtr parse(const std::string& xml, const char* what) {
  static std::once_flag once;
  std::call_once(once, [] { xmlInitParser(); });
  if (xml.find_first_not_of(" \t\r\n") == std::string::npos)
    throw MalformedXml(fmt::format("{}: empty document (expected the output of `virsh dumpxml`)", what), 0, "");
  if (xml.size() > INT_MAX)
    throw MalformedXml(fmt::format("{}: {} bytes is too large to parse", what, xml.size()), 0, "");
  std::unique_ptr<xmlParserCtxt, void (*)(xmlParserCtxt*)> ctxt(xmlNewParserCtxt(), xmlFreeParserCtxt);
  if (!ctxt) fail("{}: cannot allocate an XML parser (out of memory)", what);
  DocPtr doc(xmlCtxtReadMemory(ctxt.get(), xml.data(), static_cast<int>(xml.size()), "domain.xml", nullptr,
                               XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING));
  if (!doc || !ctxt->wellFormed || !xmlDocGetRootElement(doc.get())) {
    const xmlError* e = xmlCtxtGetLastError(ctxt.get());
    std::string msg = e && e->message ? e->message : "not well-formed";
    while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
    const int line = e ? e->line : 0;
    throw MalformedXml(fmt::format("{}: malformed XML at line {}: {} (pass the output of `virsh dumpxml` unchanged)",
                                   what, line, msg),
                       line, msg);
  }
  return doc;
}

}  // namespace ftvm::vmm::xml
