#include "host/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "base/json.h"
#include "base/error.h"
#include "base/files.h"
#include "base/numeric.h"

namespace vkvlm {
namespace fs = std::filesystem;

size_t st_dtype_size(StDType t) {
  switch (t) {
    case StDType::F64: case StDType::I64: case StDType::U64: return 8;
    case StDType::F32: case StDType::I32: case StDType::U32: return 4;
    case StDType::F16: case StDType::BF16: case StDType::I16: case StDType::U16: return 2;
    case StDType::I8: case StDType::U8: case StDType::BOOL: return 1;
  }
  return 1;
}

const char* st_dtype_name(StDType t) {
  switch (t) {
    case StDType::F64: return "F64";
    case StDType::F32: return "F32";
    case StDType::F16: return "F16";
    case StDType::BF16: return "BF16";
    case StDType::I64: return "I64";
    case StDType::I32: return "I32";
    case StDType::I16: return "I16";
    case StDType::I8: return "I8";
    case StDType::U64: return "U64";
    case StDType::U32: return "U32";
    case StDType::U16: return "U16";
    case StDType::U8: return "U8";
    case StDType::BOOL: return "BOOL";
  }
  return "?";
}

namespace {
bool parse_dtype(const std::string& s, StDType& out) {
  static const std::pair<const char*, StDType> table[] = {
      {"F64", StDType::F64}, {"F32", StDType::F32}, {"F16", StDType::F16}, {"BF16", StDType::BF16},
      {"I64", StDType::I64}, {"I32", StDType::I32}, {"I16", StDType::I16}, {"I8", StDType::I8},
      {"U64", StDType::U64}, {"U32", StDType::U32}, {"U16", StDType::U16}, {"U8", StDType::U8},
      {"BOOL", StDType::BOOL}};
  for (auto& [n, t] : table)
    if (s == n) {
      out = t;
      return true;
    }
  return false;
}

template <typename T>
T load_unaligned(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
}  // namespace

int64_t StTensor::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string StTensor::shape_string() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::vector<float> StTensor::to_f32() const {
  const int64_t n = numel();
  std::vector<float> out(static_cast<size_t>(n));
  const size_t es = st_dtype_size(dtype);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* p = data + size_t(i) * es;
    float v = 0;
    switch (dtype) {
      case StDType::F32: v = load_unaligned<float>(p); break;
      case StDType::F16: v = f16_to_f32(load_unaligned<uint16_t>(p)); break;
      case StDType::BF16: v = bf16_to_f32(load_unaligned<uint16_t>(p)); break;
      case StDType::F64: v = float(load_unaligned<double>(p)); break;
      case StDType::I64: v = float(load_unaligned<int64_t>(p)); break;
      case StDType::I32: v = float(load_unaligned<int32_t>(p)); break;
      case StDType::I16: v = float(load_unaligned<int16_t>(p)); break;
      case StDType::I8: v = float(load_unaligned<int8_t>(p)); break;
      case StDType::U64: v = float(load_unaligned<uint64_t>(p)); break;
      case StDType::U32: v = float(load_unaligned<uint32_t>(p)); break;
      case StDType::U16: v = float(load_unaligned<uint16_t>(p)); break;
      case StDType::U8: case StDType::BOOL: v = float(*p); break;
    }
    out[size_t(i)] = v;
  }
  return out;
}

SafetensorsFile::SafetensorsFile(const std::string& path, const char* what) : path_(path) {
  uint64_t size = 0;
  const int fd = open_regular_file(path, what, size);
  map_size_ = size_t(size);
  if (map_size_ < 8) {
    ::close(fd);
    fail(path, " is not a safetensors file: it is only ", map_size_, " bytes long (truncated?)");
  }
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    fail("cannot map ", path, ": ", std::strerror(errno));
  }
  try {
    const uint8_t* base = static_cast<const uint8_t*>(map_);
    const uint64_t header_len = load_unaligned<uint64_t>(base);
    if (header_len > map_size_ - 8 || header_len > (100ull << 20) || header_len < 2)
      fail(path, " is not a valid safetensors file: its header length ", header_len, " does not fit the file of ",
           map_size_, " bytes (truncated or not safetensors)");
    const char* hdr = reinterpret_cast<const char*>(base + 8);
    if (hdr[0] != '{') fail(path, " is not a valid safetensors file: the header is not a JSON object");
    nlohmann::json j;
    try {
      j = parse_json(std::string_view(hdr, header_len));
    } catch (const nlohmann::json::exception& e) {
      fail(path, " has a corrupt safetensors header: ", e.what());
    }
    if (!j.is_object()) fail(path, " has a corrupt safetensors header: not a JSON object");
    const uint8_t* data = base + 8 + header_len;
    const uint64_t data_len = map_size_ - 8 - header_len;
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    std::vector<std::string> range_names;
    for (auto& [name, v] : j.items()) {
      if (name == "__metadata__") {
        if (!v.is_object()) fail(path, ": __metadata__ is not an object");
        for (auto& [k, mv] : v.items())
          if (mv.is_string()) metadata_[k] = mv.get<std::string>();
        continue;
      }
      auto bad = [&, tensor = name](const std::string& why) { fail(path, ": tensor '", tensor, "' ", why); };
      if (!v.is_object()) bad("has a malformed header entry");
      if (!v.contains("dtype") || !v["dtype"].is_string()) bad("has no dtype");
      if (!v.contains("shape") || !v["shape"].is_array()) bad("has no shape");
      if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
        bad("has no data_offsets pair");
      StTensor t;
      t.name = name;
      t.file = path;
      if (!parse_dtype(v["dtype"].get<std::string>(), t.dtype)) bad("has unknown dtype " + v["dtype"].get<std::string>());
      for (auto& d : v["shape"]) {
        if (!d.is_number_integer() || d.get<int64_t>() < 0) bad("has an invalid shape");
        t.shape.push_back(d.get<int64_t>());
      }
      auto& off = v["data_offsets"];
      if (!off[0].is_number_unsigned() && !off[0].is_number_integer()) bad("has invalid data_offsets");
      if (!off[1].is_number_unsigned() && !off[1].is_number_integer()) bad("has invalid data_offsets");
      const int64_t b = off[0].get<int64_t>(), e = off[1].get<int64_t>();
      if (b < 0 || e < b) bad("has invalid data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + "]");
      if (uint64_t(e) > data_len)
        bad("ends at byte " + std::to_string(e) + " but the data section holds " + std::to_string(data_len) +
            " bytes (truncated file?)");
      // numel * size must equal the byte range (checked without overflow).
      uint64_t expect = st_dtype_size(t.dtype);
      for (auto d : t.shape) {
        if (d != 0 && expect > (UINT64_MAX / uint64_t(d))) bad("has a shape too large to be real");
        expect *= uint64_t(d);
      }
      if (expect != uint64_t(e - b))
        bad("of shape " + t.shape_string() + " and dtype " + st_dtype_name(t.dtype) + " needs " + std::to_string(expect) +
            " bytes but its data_offsets span " + std::to_string(e - b));
      t.data = data + b;
      t.bytes = uint64_t(e - b);
      ranges.push_back({uint64_t(b), uint64_t(e)});
      range_names.push_back(name);
      tensors_[name] = std::move(t);
    }
    std::vector<size_t> order(ranges.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranges[a] < ranges[b]; });
    for (size_t i = 1; i < order.size(); ++i) {
      auto& prev = ranges[order[i - 1]];
      auto& cur = ranges[order[i]];
      if (cur.first < prev.second && cur.second > cur.first)
        fail(path, ": tensors '", range_names[order[i - 1]], "' and '", range_names[order[i]], "' overlap");
    }
  } catch (...) {
    ::munmap(map_, map_size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

TensorStore TensorStore::open_file(const std::string& path) {
  TensorStore s;
  s.where_ = path;
  s.files_.push_back(std::make_shared<SafetensorsFile>(path));
  for (auto& [n, t] : s.files_.back()->tensors()) s.index_[n] = &t;
  return s;
}

TensorStore TensorStore::in_memory(std::vector<StTensor> tensors, std::shared_ptr<const void> memory, std::string where) {
  TensorStore s;
  s.where_ = std::move(where);
  for (const auto& t : tensors)
    if (uint64_t(t.numel()) * st_dtype_size(t.dtype) != t.bytes || (!t.data && t.bytes))
      fail("internal: in-memory tensor ", t.name, " has ", t.bytes, " bytes for ", t.shape_string());
  auto owned = std::make_shared<std::vector<StTensor>>(std::move(tensors));
  for (const auto& t : *owned)
    if (!s.index_.emplace(t.name, &t).second) fail("internal: two in-memory tensors are named ", t.name);
  s.in_memory_ = owned;
  s.memory_ = std::move(memory);
  return s;
}

TensorStore TensorStore::open_directory(const std::string& dir) {
  TensorStore s;
  s.where_ = dir;
  const fs::path d(dir);
  const fs::path index = d / "model.safetensors.index.json";
  std::error_code ec;
  if (fs::exists(index, ec)) {
    nlohmann::json j;
    {
      const std::string text = read_file_bounded(index.string(), uint64_t(64) << 20, "weights index");
      try {
        j = parse_json(text);
      } catch (const nlohmann::json::exception& e) {
        fail(index.string(), " is not valid JSON: ", e.what());
      }
    }
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      fail(index.string(), " has no weight_map object");
    std::map<std::string, std::shared_ptr<SafetensorsFile>> by_file;
    for (auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) fail(index.string(), ": the shard of tensor '", name, "' is not a file name");
      const std::string f = file.get<std::string>();
      if (f.find("..") != std::string::npos || (!f.empty() && f[0] == '/'))
        fail(index.string(), ": shard name '", f, "' points outside the checkpoint folder");
      auto& sf = by_file[f];
      if (!sf) {
        const fs::path p = d / f;
        if (!fs::exists(p, ec)) fail(index.string(), " lists shard ", f, " which is missing from ", dir);
        sf = std::make_shared<SafetensorsFile>(p.string());
        s.files_.push_back(sf);
      }
      auto it = sf->tensors().find(name);
      if (it == sf->tensors().end())
        fail(index.string(), " places tensor '", name, "' in ", f, ", which does not contain it");
      s.index_[name] = &it->second;
    }
    return s;
  }
  std::vector<fs::path> files;
  if (fs::exists(d / "model.safetensors", ec)) {
    files.push_back(d / "model.safetensors");
  } else {
    for (auto& e : fs::directory_iterator(d, ec))
      if (e.path().extension() == ".safetensors") files.push_back(e.path());
    std::sort(files.begin(), files.end());
  }
  if (files.empty()) fail("no *.safetensors weights found in ", dir);
  for (auto& f : files) {
    s.files_.push_back(std::make_shared<SafetensorsFile>(f.string()));
    for (auto& [n, t] : s.files_.back()->tensors()) {
      if (s.index_.count(n)) fail("tensor '", n, "' appears in two files of ", dir);
      s.index_[n] = &t;
    }
  }
  return s;
}

const StTensor* TensorStore::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

const StTensor& TensorStore::get(const std::string& name) const {
  if (auto* t = find(name)) return *t;
  fail("tensor '", name, "' is missing from the checkpoint in ", where_);
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> v;
  for (auto& [n, t] : index_) v.push_back(n);
  return v;
}

uint64_t TensorStore::total_bytes() const {
  uint64_t n = 0;
  for (auto& [k, t] : index_) n += t->bytes;
  return n;
}

void write_safetensors_file(const std::string& path, const std::vector<StWrite>& tensors,
                            const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    if (uint64_t(n) * st_dtype_size(t.dtype) != t.bytes)
      fail("internal: tensor ", t.name, " has ", t.bytes, " bytes for its shape and dtype");
    header[t.name] = {{"dtype", st_dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes}}};
    offset += t.bytes;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  std::error_code dir_ec;
  if (fs::is_directory(path, dir_ec)) fail("cannot write ", path, ": it is a folder (give a file name)");
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  {
    errno = 0;
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out)
      fail("cannot write ", path, ": ", errno ? std::strerror(errno) : "its folder does not take a new file");
    const uint64_t n = h.size();
    char len[8];
    for (int i = 0; i < 8; ++i) len[i] = char((n >> (8 * i)) & 0xFF);
    out.write(len, 8);
    out.write(h.data(), std::streamsize(h.size()));
    for (const auto& t : tensors) out.write(static_cast<const char*>(t.data), std::streamsize(t.bytes));
    out.flush();
    if (!out) {
      std::error_code ec;
      fs::remove(tmp, ec);
      fail("cannot write ", path, " (disk full?)");
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    fail("cannot write ", path, ": ", ec.message());
  }
}

}  // namespace vkvlm
