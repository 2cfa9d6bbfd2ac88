// egx_query: ask `egx serve` about an image from C++ (embedded boards). `egx_query --help`:
//   egx_query --connect tcp://127.0.0.1:5555 --image scene.pgm --modality sar --text "Segment the ship."
//             [--point X,Y]... [--box X0,Y0,X1,Y1]... [--task T] [--max-new-tokens N] [--stream]
//             [--timeout S] [--retries N] [--server-key server.key --client-key client.key_secret]
// Images are binary PGM (grey) or PPM (RGB), 8 or 16 bits: what sensors and `convert` write.
// Prints the result JSON on stdout; streamed text and mask areas go to stderr.
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

#include "client.hpp"
#include "rle.hpp"

namespace {

const char* const kUsage =
    "usage: egx_query --connect ADDR --image IMAGE.pgm|.ppm --modality optical|sar|infrared [--text TEXT]\n"
    "                 [--point X,Y]... [--box X0,Y0,X1,Y1]... [--task T] [--max-new-tokens N] [--stream]\n"
    "                 [--timeout S] [--retries N] [--server-key server.key --client-key client.key_secret]\n"
    "\n"
    "Ask `egx serve` (protocol EGX/1, docs/protocol.md) about one image; prints the result JSON on stdout,\n"
    "streamed text and mask areas on stderr.\n"
    "\n"
    "  --connect ADDR        the server, e.g. tcp://127.0.0.1:5555\n"
    "  --image FILE          binary PGM (grey) or PPM (RGB), 8 or 16 bits\n"
    "  --modality M          optical, sar or infrared\n"
    "  --text TEXT           the instruction or question\n"
    "  --point X,Y           point prompt, pixel column,row (repeatable)\n"
    "  --box X0,Y0,X1,Y1     box prompt, pixel edges (repeatable)\n"
    "  --task T              auto (default), caption, classify, vqa, region, grounding, segment, click\n"
    "  --max-new-tokens N    tokens to generate, an integer >= 0 (default 64)\n"
    "  --stream              print text on stderr as it is generated\n"
    "  --timeout S           seconds of silence before a retry, > 0 (default 60)\n"
    "  --retries N           retries, an integer >= 0 (default 2)\n"
    "  --server-key FILE     the server's public .key (CURVE; with --client-key)\n"
    "  --client-key FILE     this client's .key_secret (CURVE)\n"
    "  -h, --help            this text\n"
    "\n"
    "Exit status: 0 answered, 2 bad input or no answer, 3 the server answered with an error.\n";

// --help: printed by main, which then exits 0.
struct HelpRequested {};

struct Args {
  std::string connect, image, modality, text, task = "auto", server_key, client_key;
  std::vector<std::vector<double>> points, boxes;
  int max_new_tokens = 64, retries = 2;
  double timeout_s = 60;
  bool stream = false;
};

std::vector<double> numbers(const std::string& text, size_t n, const std::string& what) {
  std::vector<double> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    double v = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0') throw std::invalid_argument(what + " expects numbers, got " + text);
    out.push_back(v);
  }
  if (out.size() != n) throw std::invalid_argument(what + " expects " + std::to_string(n) + " numbers, got " + text);
  return out;
}

// A whole decimal integer in [lo, hi]; anything else names the option and the value.
int integer(const std::string& text, const std::string& what, long lo, long hi) {
  errno = 0;
  char* end = nullptr;
  long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE || v < lo || v > hi)
    throw std::invalid_argument(what + " expects an integer from " + std::to_string(lo) + " to " +
                                std::to_string(hi) + ", got '" + text + "'");
  return static_cast<int>(v);
}

// A whole number in (0, hi].
double positive(const std::string& text, const std::string& what, double hi) {
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(v > 0 && v <= hi))
    throw std::invalid_argument(what + " expects a number > 0 and <= " + std::to_string(static_cast<long>(hi)) +
                                ", got '" + text + "'");
  return v;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "-h" || k == "--help") throw HelpRequested{};
    if (k == "--stream") { a.stream = true; continue; }
    if (i + 1 >= argc) throw std::invalid_argument(k + " needs a value");
    std::string v = argv[++i];
    if (k == "--connect") a.connect = v;
    else if (k == "--image") a.image = v;
    else if (k == "--modality") a.modality = v;
    else if (k == "--text") a.text = v;
    else if (k == "--task") a.task = v;
    else if (k == "--point") a.points.push_back(numbers(v, 2, "--point"));
    else if (k == "--box") a.boxes.push_back(numbers(v, 4, "--box"));
    else if (k == "--max-new-tokens") a.max_new_tokens = integer(v, k, 0, INT_MAX);
    else if (k == "--timeout") a.timeout_s = positive(v, k, 1e6);
    else if (k == "--retries") a.retries = integer(v, k, 0, 1000);
    else if (k == "--server-key") a.server_key = v;
    else if (k == "--client-key") a.client_key = v;
    else throw std::invalid_argument("unknown option " + k);
  }
  if (a.connect.empty() || a.image.empty() || a.modality.empty())
    throw std::invalid_argument("--connect, --image and --modality are required");
  if (a.server_key.empty() != a.client_key.empty())
    throw std::invalid_argument("CURVE needs both --server-key and --client-key");
  return a;
}

// Binary PGM (P5) or PPM (P6), maxval <= 65535 -> a tensor named "image" ((H, W) or (H, W, 3)).
egx::Tensor read_pnm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::string magic;
  in >> magic;
  auto token = [&in]() {
    std::string t;
    while (in >> t && t[0] == '#') std::getline(in, t);
    return t;
  };
  if (magic != "P5" && magic != "P6")
    throw std::runtime_error(path + " is not a binary PGM/PPM (P5/P6); convert the image first");
  int w = integer(token(), path + ": width", 1, 1 << 20), h = integer(token(), path + ": height", 1, 1 << 20);
  int maxval = integer(token(), path + ": maxval", 1, 65535);
  in.get();  // the one whitespace byte before the pixels
  int channels = magic == "P6" ? 3 : 1, bytes = maxval > 255 ? 2 : 1;
  egx::Tensor t{"image", bytes == 2 ? "<u2" : "|u1", {h, w}, {}};
  if (channels == 3) t.shape.push_back(3);
  const size_t need = static_cast<size_t>(h) * w * channels * bytes;
  const std::streampos start = in.tellg();
  in.seekg(0, std::ios::end);
  const std::streamoff left = in.tellg() - start;
  in.seekg(start);
  if (left < 0 || static_cast<size_t>(left) < need)  // checked before allocating what the header claims
    throw std::runtime_error(path + " is shorter than its header says");
  t.bytes.resize(need);
  if (!in.read(&t.bytes[0], static_cast<std::streamsize>(need)))
    throw std::runtime_error(path + " is shorter than its header says");
  if (bytes == 2)  // PNM is big-endian; the protocol is little-endian
    for (size_t k = 0; k + 1 < t.bytes.size(); k += 2) std::swap(t.bytes[k], t.bytes[k + 1]);
  return t;
}

egx::Json list_of(const std::vector<std::vector<double>>& rows) {
  egx::Json out = egx::Json::array();
  for (const auto& r : rows) {
    egx::Json row = egx::Json::array();
    for (double v : r) row.push(v);
    out.push(row);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  try {
    a = parse(argc, argv);
  } catch (const HelpRequested&) {
    std::cout << kUsage;
    return 0;
  } catch (const std::invalid_argument& e) {
    std::cerr << "egx_query: error: " << e.what() << " (egx_query --help)\n";
    return 2;
  }
  try {
    egx::Tensor image = read_pnm(a.image);
    egx::Json header = egx::Json::object();
    header.set("task", a.task);
    header.set("text", a.text);
    egx::Json spec = egx::Json::object();
    spec.set("modality", a.modality);
    header.set("image", spec);
    header.set("points", list_of(a.points));
    header.set("boxes", list_of(a.boxes));
    egx::Json generation = egx::Json::object();
    generation.set("max_new_tokens", a.max_new_tokens);
    header.set("generation", generation);
    header.set("stream", a.stream);

    egx::CurveKeys keys;
    if (!a.server_key.empty()) {
      keys.server_public = egx::read_key_file(a.server_key).first;
      auto pair = egx::read_key_file(a.client_key);
      if (pair.second.empty()) throw std::runtime_error(a.client_key + " holds no secret key; give the .key_secret");
      keys.client_public = pair.first;
      keys.client_secret = pair.second;
    }
    egx::Client client(a.connect, static_cast<int>(a.timeout_s * 1000), a.retries,
                       a.server_key.empty() ? nullptr : &keys);
    egx::Json reply = client.request(header, {image}, [](const egx::Json& partial) {
      std::cerr << partial.get("text").as_string() << std::flush;
    });
    if (a.stream) std::cerr << "\n";
    const egx::Json& result = reply.get("result");
    for (size_t k = 0; k < result.get("masks").items().size(); ++k) {
      const egx::Json& m = result.get("masks").items()[k];
      auto mask = egx::rle_decode(m.get("counts").as_string(),
                                  static_cast<uint32_t>(m.get("size").items()[0].as_number()),
                                  static_cast<uint32_t>(m.get("size").items()[1].as_number()));
      size_t area = 0;
      for (auto v : mask) area += v;
      std::cerr << "mask " << k << ": " << area << " pixels\n";
    }
    std::cout << result.dump() << "\n";
    return 0;
  } catch (const egx::ServerError& e) {
    std::cerr << "egx_query: server error " << e.what() << "\n";
    return 3;
  } catch (const std::exception& e) {
    std::cerr << "egx_query: error: " << e.what() << "\n";
    return 2;
  }
}
