#include "io/config_json.h"

#include <filesystem>
#include <fstream>
#include <sstream>

namespace loom::io::config_json {

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  LOOM_CHECK(in.good(), path, ": cannot open the config file");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in.good()) throw io::FileError(path, "cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    throw io::FileError(path, std::string("not valid JSON (") + e.what() + ")");
  }
}

bool dir_has_class(const std::string& dir, const std::string& class_name) {
  const std::filesystem::path p = std::filesystem::path(dir) / "config.json";
  if (!std::filesystem::is_regular_file(p)) return false;
  try {
    const json j = read_json_file(p.string());
    return j.is_object() && j.contains("_class_name") && j.at("_class_name") == class_name;
  } catch (const Error&) {
    return false;
  }
}

json parse_object(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    LOOM_FAIL(source, ": not valid JSON (", e.what(), ")");
  }
  LOOM_CHECK(j.is_object(), source, ": expected a JSON object, got ", j.type_name());
  return j;
}

void check_class_name(const json& j, const std::string& expected, const std::string& source,
                      const std::string& what_else) {
  if (j.contains("_class_name") && j.at("_class_name").is_string())
    LOOM_CHECK(j.at("_class_name") == expected, source, ": _class_name is ", j.at("_class_name").dump(), ", not ",
               expected, what_else);
}

void note_unknown_keys(const json& j, const std::set<std::string>& known, const std::set<std::string>& no_effect,
                       const std::string& source, std::vector<std::string>& notes) {
  for (const auto& [key, value] : j.items()) {
    if (known.count(key) || key.rfind("_", 0) == 0) continue;
    if (no_effect.count(key))
      notes.push_back(source + ": '" + key + "' (" + value.dump() + ") has no effect on the supported block types");
    else
      notes.push_back(source + ": ignoring unknown key '" + key + "' (" + value.dump() + ")");
  }
}

int64_t Reader::integer(const json& v, const std::string& key) const {
  LOOM_CHECK(v.is_number_integer(), source, ": key '", key, "' must be an integer, got ", v.dump());
  return v.get<int64_t>();
}

int64_t Reader::required_positive(const std::string& key) const {
  LOOM_CHECK(has(key), source, ": required key '", key, "' is missing");
  const int64_t v = integer(j.at(key), key);
  LOOM_CHECK(v > 0, source, ": key '", key, "' must be positive, got ", v);
  return v;
}

double Reader::number(const json& v, const std::string& key) const {
  LOOM_CHECK(v.is_number(), source, ": key '", key, "' must be a number, got ", v.dump());
  return v.get<double>();
}

bool Reader::boolean(const json& v, const std::string& key) const {
  LOOM_CHECK(v.is_boolean(), source, ": key '", key, "' must be true or false, got ", v.dump());
  return v.get<bool>();
}

std::string Reader::string(const json& v, const std::string& key) const {
  LOOM_CHECK(v.is_string(), source, ": key '", key, "' must be a string, got ", v.dump());
  return v.get<std::string>();
}

std::vector<std::string> Reader::strings(const std::string& key) const {
  LOOM_CHECK(has(key) && j.at(key).is_array() && !j.at(key).empty(), source, ": key '", key,
             "' must be a non-empty list of block type names");
  std::vector<std::string> out;
  for (const json& v : j.at(key)) out.push_back(string(v, key));
  return out;
}

}  // namespace loom::io::config_json
