// Logging: one line per event on stderr (or a file), "TIME LEVEL [component] message".
// Thread-safe. Timestamps are wall-clock with microseconds so logs of two daemons on one host
// can be merged; tests parse lines that start with a level and a component.
#pragma once

#include <string>
#include <string_view>

#include <fmt/format.h>

namespace ftvm::log {

enum class Level { Debug = 0, Info = 1, Warn = 2, Error = 3 };

void set_level(Level l);
// Redirect output to `path` (appended). Throws ftvm::SysError when it cannot be opened.
void set_file(const std::string& path);
void write(Level l, std::string_view component, std::string_view msg);
bool enabled(Level l);

template <typename... A>
void debug(std::string_view c, fmt::format_string<A...> f, A&&... a) {
  if (enabled(Level::Debug)) write(Level::Debug, c, fmt::format(f, std::forward<A>(a)...));
}
template <typename... A>
void info(std::string_view c, fmt::format_string<A...> f, A&&... a) {
  if (enabled(Level::Info)) write(Level::Info, c, fmt::format(f, std::forward<A>(a)...));
}
template <typename... A>
void warn(std::string_view c, fmt::format_string<A...> f, A&&... a) {
  if (enabled(Level::Warn)) write(Level::Warn, c, fmt::format(f, std::forward<A>(a)...));
}
template <typename... A>
void error(std::string_view c, fmt::format_string<A...> f, A&&... a) {
  write(Level::Error, c, fmt::format(f, std::forward<A>(a)...));
}

}  // namespace ftvm::log
