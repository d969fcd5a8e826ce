// The config.json helpers shared by loom's model configs (attention/'s Transformer2DConfig, unet/'s
// UNet2DConditionConfig and AutoencoderKLConfig) and loaders (unet_io.cpp, ldm_checkpoint.cpp,
// vae.cpp). It includes nlohmann/json: its users link nlohmann_json privately. Every error names
// the file (`source`) and the key.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "io/tensor_file.h"

namespace loom::io::config_json {

using nlohmann::json;

// ---- files ----
// The text of a config file; Error "<path>: cannot open the config file".
std::string read_text(const std::string& path);
// A JSON file (a sharded index, a config): io::FileError naming it when it cannot be opened or parsed.
json read_json_file(const std::string& path);
// True when dir/config.json is a JSON object whose "_class_name" is `class_name` (false for any
// problem: the caller decides what a directory is).
bool dir_has_class(const std::string& dir, const std::string& class_name);

// ---- parsing ----
// `text` parsed as a JSON object; Error "<source>: not valid JSON (…)" or "expected a JSON object".
json parse_object(const std::string& text, const std::string& source);
// An Error when `_class_name` is a string other than `expected` (`what_else`: what loom implements).
void check_class_name(const json& j, const std::string& expected, const std::string& source,
                      const std::string& what_else = "");
// Notes "<source>: ignoring unknown key 'k' (v)" for every key neither in `known` nor private
// (`_…`); keys in `no_effect` get "<source>: 'k' (v) has no effect on the supported block types".
void note_unknown_keys(const json& j, const std::set<std::string>& known, const std::set<std::string>& no_effect,
                       const std::string& source, std::vector<std::string>& notes);

// Typed reads of one config's keys; each Error names the source and the key.
struct Reader {
  const json& j;
  const std::string& source;

  // Present and not null.
  bool has(const std::string& key) const { return j.contains(key) && !j.at(key).is_null(); }

  int64_t integer(const json& v, const std::string& key) const;
  double number(const json& v, const std::string& key) const;
  bool boolean(const json& v, const std::string& key) const;
  std::string string(const json& v, const std::string& key) const;

  // Sets `f` when the key is present (and not null).
  void opt(const std::string& key, int64_t& f) const { if (has(key)) f = integer(j.at(key), key); }
  void opt(const std::string& key, double& f) const { if (has(key)) f = number(j.at(key), key); }
  void opt(const std::string& key, bool& f) const { if (has(key)) f = boolean(j.at(key), key); }
  void opt(const std::string& key, std::string& f) const { if (has(key)) f = string(j.at(key), key); }
  void opt(const std::string& key, std::optional<int64_t>& f) const { if (has(key)) f = integer(j.at(key), key); }
  // A positive integer that must be present; Error "<source>: required key 'k' is missing".
  int64_t required_positive(const std::string& key) const;

  // A non-empty list of block type names.
  std::vector<std::string> strings(const std::string& key) const;

  // A scalar repeated n times, or a list of exactly n entries (one per down block).
  template <typename T, typename F>
  std::vector<T> per_block(const std::string& key, size_t n, T fallback, F&& read) const {
    if (!has(key)) return std::vector<T>(n, fallback);
    const json& v = j.at(key);
    if (!v.is_array()) return std::vector<T>(n, read(v, key));
    LOOM_CHECK(v.size() == n, source, ": key '", key, "' has ", v.size(), " entries, expected ", n,
               " (one per down block)");
    std::vector<T> out;
    for (const json& e : v) out.push_back(read(e, key));
    return out;
  }
};

// ---- loading ----
// `Config::from_file(path)` with every problem an io::FileError naming the path (exit code 3).
template <typename Config>
Config read_config_file(const std::string& path) {
  try {
    return Config::from_file(path);
  } catch (const io::FileError&) {
    throw;
  } catch (const Error& e) {
    throw io::FileError(path, e.what());
  }
}

}  // namespace loom::io::config_json
