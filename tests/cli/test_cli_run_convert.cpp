// The `loom` command line (SPEC §6) run as a separate process: `loom run`, `inspect`, `convert` and `gradcheck`.
//
// Its own test executable (test_cli_run_convert): the tests are in the suite Cli of
// tests/cli/cli_fixture.h, whose fixture class is one per translation unit, and GoogleTest refuses
// one suite with two fixture classes in one executable. Exit codes and fixtures as in test_cli.cpp.
#include "tests/cli/cli_fixture.h"

namespace loom {
namespace {

// ---- run ----------------------------------------------------------------------------------------

TEST_F(Cli, RunWithAdaptersWeightsFuseAndBackends) {
  standard_fixtures();
  ASSERT_EQ(train("a1", {"--lr", "0.02", "--seed", "1"}).code, 0);
  ASSERT_EQ(train("a2", {"--lr", "0.02", "--seed", "2", "--rank", "2", "--alpha", "4"}).code, 0);
  const std::string a1 = path("a1/adapter.safetensors"), a2 = path("a2/adapter.safetensors");

  const Tensor base = run("base.safetensors");
  ASSERT_TRUE(base.defined());
  EXPECT_EQ(base.shape(), (Shape{6, 8, 4, 4}));

  const Tensor one = run("one.safetensors", {"--adapter", a1});
  ASSERT_TRUE(one.defined());
  EXPECT_GT(rel_error(one, base), 1e-3) << "the adapter hardly changes the output: the checks below would be weak";

  // Weight 0 gives the base output bit for bit (SPEC §4).
  const Tensor zero = run("zero.safetensors", {"--adapter", a1 + ":0"});
  ASSERT_TRUE(zero.defined());
  EXPECT_EQ(zero.to_vector(), base.to_vector());

  // Weight 1 written out is the default.
  const Tensor one_w = run("one_w.safetensors", {"--adapter", a1 + ":1.0"});
  ASSERT_TRUE(one_w.defined());
  EXPECT_EQ(one_w.to_vector(), one.to_vector());

  const std::vector<std::string> two{"--adapter", a1 + ":0.5", "--adapter", a2 + ":1.5"};
  const Tensor unfused = run("two.safetensors", two);
  auto fused_args = two;
  fused_args.push_back("--fuse");
  const Tensor fused = run("two_fused.safetensors", fused_args);
  ASSERT_TRUE(unfused.defined() && fused.defined());
  EXPECT_GT(rel_error(unfused, one), 1e-3);
  EXPECT_LE(rel_error(fused, unfused), 1e-5);

  for (const char* backend : {"math", "flash", "sliced"}) {
    auto args = two;
    args.insert(args.end(), {"--backend", backend});
    const Tensor b = run(std::string("two_") + backend + ".safetensors", args);
    ASSERT_TRUE(b.defined()) << backend;
    EXPECT_LE(rel_error(b, unfused), 1e-5) << backend;
  }

  // Batches of 4 (6 samples: 4 + 2) give the batch-8 result.
  auto batched = two;
  batched.insert(batched.end(), {"--batch-size", "4"});
  const Tensor b4 = run("two_b4.safetensors", batched);
  ASSERT_TRUE(b4.defined());
  EXPECT_LE(rel_error(b4, unfused), 1e-6);

  // HDF5 output, readable with the library's reader.
  ASSERT_TRUE(run("two.h5", two).defined());
  const io::TensorFile h5 = io::read_hdf5(path("two.h5"));
  const Tensor* h = h5.find("output");
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(h->shape(), unfused.shape());
  EXPECT_EQ(h->to_vector(), unfused.to_vector());
  EXPECT_EQ(io::detect_format(path("two.h5")), io::FileFormat::Hdf5);
}

TEST_F(Cli, RunOnBadInputsExitsWithCode3) {
  standard_fixtures();
  ASSERT_EQ(train("a").code, 0);
  const std::string adapter = path("a/adapter.safetensors");
  auto run_args = [&](std::vector<std::string> extra, const std::string& input = "data.safetensors",
                      const std::string& model = "model") {
    std::vector<std::string> args{"run", "--model", path(model), "--input", path(input), "--output",
                                  path("out.safetensors")};
    args.insert(args.end(), extra.begin(), extra.end());
    return loom(args);
  };

  const Result missing_input = run_args({}, "nowhere.safetensors");
  EXPECT_EQ(missing_input.code, 3) << missing_input;
  EXPECT_THAT(missing_input.err, HasSubstr("nowhere.safetensors"));

  const Result missing_model = run_args({}, "data.safetensors", "no-model");
  EXPECT_EQ(missing_model.code, 3) << missing_model;
  EXPECT_THAT(missing_model.err, HasSubstr("config.json"));

  const Result missing_adapter = run_args({"--adapter", path("none.safetensors")});
  EXPECT_EQ(missing_adapter.code, 3) << missing_adapter;
  EXPECT_THAT(missing_adapter.err, HasSubstr("none.safetensors"));

  // A data file without hidden_states.
  io::write_safetensors(path("nohs.safetensors"), {{"encoder_hidden_states", Tensor::zeros({6, 5, 6})}});
  const Result no_hs = run_args({}, "nohs.safetensors");
  EXPECT_EQ(no_hs.code, 3) << no_hs;
  EXPECT_THAT(no_hs.err, HasSubstr("hidden_states"));

  // Corrupt adapters: random bytes, a truncated copy.
  Generator gen(3);
  std::string noise(1000, '\0');
  for (char& ch : noise) ch = char(gen.next_u64() & 0xff);
  write_bytes(path("noise.safetensors"), noise);
  const Result corrupt = run_args({"--adapter", path("noise.safetensors")});
  EXPECT_EQ(corrupt.code, 3) << corrupt;
  EXPECT_THAT(corrupt.err, HasSubstr("noise.safetensors"));
  const std::string bytes = read_bytes(adapter);
  write_bytes(path("cut.safetensors"), bytes.substr(0, bytes.size() - 20));
  const Result cut = run_args({"--adapter", path("cut.safetensors")});
  EXPECT_EQ(cut.code, 3) << cut;
  EXPECT_THAT(cut.err, HasSubstr("cut.safetensors"));

  // An adapter holding NaN.
  {
    io::TensorFile f = io::read_safetensors(adapter);
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const auto& [k, t] : f.tensors) tensors.emplace_back(k, t.clone());
    tensors[0].second.fill_(NAN);
    io::write_safetensors(path("nan.safetensors"), tensors, f.metadata);
  }
  const Result nan = run_args({"--adapter", path("nan.safetensors")});
  EXPECT_EQ(nan.code, 3) << nan;
  EXPECT_THAT(nan.err, AllOf(HasSubstr("nan.safetensors"), HasSubstr("NaN")));

  // A file that is no adapter (the data file): nothing matches.
  const Result not_adapter = run_args({"--adapter", path("data.safetensors")});
  EXPECT_EQ(not_adapter.code, 3) << not_adapter;
  EXPECT_THAT(not_adapter.err, HasSubstr("data.safetensors"));

  // An adapter of another base model (cross_attention_dim 7): strict load names the key.
  ModelSpec other;
  other.cross_attention_dim = 7;
  write_model_dir(path("model7"), other);
  write_data(path("data7.safetensors"), other);
  ASSERT_EQ(train("a7", {}, "model7", "data7.safetensors").code, 0);
  const Result mismatched = run_args({"--adapter", path("a7/adapter.safetensors")});
  EXPECT_EQ(mismatched.code, 3) << mismatched;
  EXPECT_THAT(mismatched.err, AllOf(HasSubstr("a7/adapter.safetensors"), HasSubstr("key '"),
                                    HasSubstr("attn2.to_"), HasSubstr("wrong base model")));
  // ... and the other way round: input for model7 on the standard model.
  const Result wrong_data = run_args({}, "data7.safetensors");
  EXPECT_EQ(wrong_data.code, 3) << wrong_data;
  EXPECT_THAT(wrong_data.err, HasSubstr("cross_attention_dim"));

  EXPECT_FALSE(exists(path("out.safetensors")));
}

TEST_F(Cli, RunWithAPrefixedFullUnetFile) {
  const std::string prefix = "down_blocks.0.attentions.0";
  write_model_dir(path("model"));
  write_model_dir(path("unet"), {}, prefix);  // same weights, stored under the prefix
  write_data(path("data.safetensors"));
  ASSERT_EQ(train("plain", {"--lr", "0.02"}).code, 0);
  const Result t = train("prefixed", {"--lr", "0.02", "--prefix", prefix}, "unet");
  ASSERT_EQ(t.code, 0) << t;
  const io::TensorFile f = io::read_safetensors(path("prefixed/adapter.safetensors"));
  ASSERT_FALSE(f.tensors.empty());
  for (const auto& [k, v] : f.tensors) EXPECT_EQ(k.rfind("unet." + prefix + ".", 0), 0u) << k;

  const Tensor plain = run("plain.safetensors", {"--adapter", path("plain/adapter.safetensors")});
  const Tensor prefixed =
      run("prefixed.safetensors", {"--prefix", prefix, "--adapter", path("prefixed/adapter.safetensors")}, "unet");
  ASSERT_TRUE(plain.defined() && prefixed.defined());
  EXPECT_LE(rel_error(prefixed, plain), 1e-6);

  // The prefixed model without --prefix, and a prefix that is not in the file.
  const Result no_prefix = loom({"run", "--model", path("unet"), "--input", path("data.safetensors"), "--output",
                                 path("x.safetensors")});
  EXPECT_EQ(no_prefix.code, 3) << no_prefix;
  EXPECT_THAT(no_prefix.err, HasSubstr("model.safetensors"));
  const Result wrong_prefix = loom({"run", "--model", path("unet"), "--prefix", "up_blocks.1.attentions.2", "--input",
                                    path("data.safetensors"), "--output", path("x.safetensors")});
  EXPECT_EQ(wrong_prefix.code, 3) << wrong_prefix;
  EXPECT_THAT(wrong_prefix.err, HasSubstr("up_blocks.1.attentions.2"));
}

TEST_F(Cli, RunWithANonFiniteOutputExitsWithCode4) {
  standard_fixtures();
  // Finite inputs (|v| ≤ 3e38) whose sums in the model overflow f32.
  Generator gen(1);
  std::vector<double> huge = Tensor::randn({2, 8, 4, 4}, gen, DType::F64).to_vector();
  for (double& v : huge) v = std::max(-3e38, std::min(3e38, v * 1e38));
  io::write_safetensors(path("huge.safetensors"), {{"hidden_states", Tensor::from_values(huge, {2, 8, 4, 4})},
                                                   {"encoder_hidden_states", Tensor::randn({2, 5, 6}, gen)}});
  const Result r = loom({"run", "--model", path("model"), "--input", path("huge.safetensors"), "--output",
                         path("o.safetensors")});
  EXPECT_EQ(r.code, 4) << r;
  EXPECT_THAT(r.err, HasSubstr("NaN or Inf"));
  EXPECT_FALSE(exists(path("o.safetensors")));
}

// ---- inspect ------------------------------------------------------------------------------------

TEST_F(Cli, InspectAdaptersCheckpointsAndDataFiles) {
  standard_fixtures();
  ASSERT_EQ(train("a", {"--rank", "3", "--alpha", "6"}).code, 0);

  const Result peft = loom({"inspect", path("a/adapter.safetensors")});
  ASSERT_EQ(peft.code, 0) << peft;
  EXPECT_THAT(peft.out, AllOf(HasSubstr("format   safetensors"), HasSubstr("family   peft"), HasSubstr("modules  8"),
                              HasSubstr("transformer_blocks.0.attn1.to_q"), HasSubstr("r=3"), HasSubstr("alpha=6"),
                              HasSubstr("scale=2"), HasSubstr("lora_adapter_metadata"),
                              HasSubstr("lora_A.weight")));

  const Result to_kohya = loom({"convert", path("a/adapter.safetensors"), path("k.safetensors"), "--to", "kohya"});
  ASSERT_EQ(to_kohya.code, 0) << to_kohya;
  const Result kohya = loom({"inspect", path("k.safetensors")});
  ASSERT_EQ(kohya.code, 0) << kohya;
  EXPECT_THAT(kohya.out, AllOf(HasSubstr("family   kohya"), HasSubstr("r=3"), HasSubstr("alpha=6"),
                               HasSubstr("lora_unet_transformer_blocks_0_attn2_to_k.lora_down.weight"),
                               HasSubstr(".alpha")));

  const Result ckpt = loom({"inspect", path("a/checkpoint.h5")});
  ASSERT_EQ(ckpt.code, 0) << ckpt;
  EXPECT_THAT(ckpt.out, AllOf(HasSubstr("format   HDF5"), HasSubstr("kind = checkpoint"), HasSubstr("format = loom")));

  const Result data = loom({"inspect", path("data.safetensors")});
  ASSERT_EQ(data.code, 0) << data;
  EXPECT_THAT(data.out, AllOf(HasSubstr("tensors  3"), HasSubstr("hidden_states"), HasSubstr("encoder_hidden_states"),
                              HasSubstr("target"), Not(HasSubstr("family"))));

  const Result missing = loom({"inspect", path("nowhere.safetensors")});
  EXPECT_EQ(missing.code, 3) << missing;
  EXPECT_THAT(missing.err, HasSubstr("nowhere.safetensors"));

  write_bytes(path("notes.txt"), "these are not tensors\n");
  const Result text = loom({"inspect", path("notes.txt")});
  EXPECT_EQ(text.code, 3) << text;
  EXPECT_THAT(text.err, HasSubstr("notes.txt"));

  write_bytes(path("empty.safetensors"), "");
  const Result empty = loom({"inspect", path("empty.safetensors")});
  EXPECT_EQ(empty.code, 3) << empty;
  EXPECT_THAT(empty.err, HasSubstr("empty.safetensors"));

  const Result directory = loom({"inspect", path("a")});
  EXPECT_EQ(directory.code, 3) << directory;
}

// ---- convert ------------------------------------------------------------------------------------

TEST_F(Cli, ConvertRoundTripKeepsOutputs) {
  standard_fixtures();
  ASSERT_EQ(train("a", {"--lr", "0.02", "--alpha", "2"}).code, 0);
  const Tensor want = run("want.safetensors", {"--adapter", path("a/adapter.safetensors")});
  ASSERT_TRUE(want.defined());

  struct Step {
    std::string from, to, family, marker;
  };
  const std::vector<Step> chain{{"a/adapter.safetensors", "k.safetensors", "kohya", "lora_unet_"},
                                {"k.safetensors", "d.safetensors", "diffusers", ".lora.down.weight"},
                                {"d.safetensors", "l.h5", "loom", ""},
                                {"l.h5", "p.safetensors", "peft", ".lora_A.weight"}};
  for (const Step& s : chain) {
    const Result c = loom({"convert", path(s.from), path(s.to), "--to", s.family});
    ASSERT_EQ(c.code, 0) << c;
    EXPECT_THAT(c.out, HasSubstr("wrote " + path(s.to)));
    const io::TensorFile f = io::read_tensor_file(path(s.to));
    ASSERT_FALSE(f.tensors.empty()) << s.to;
    if (!s.marker.empty()) {
      EXPECT_THAT(f.tensors.front().first, HasSubstr(s.marker)) << s.to;
    }
    const Tensor got = run(s.to + ".out.safetensors", {"--adapter", path(s.to)});
    ASSERT_TRUE(got.defined()) << s.to;
    EXPECT_LE(rel_error(got, want), 1e-6) << s.family;
  }
  EXPECT_EQ(io::detect_format(path("l.h5")), io::FileFormat::Hdf5);
  // Back to PEFT: the same keys as the trained adapter, the same down weights (the diffusers step
  // folds alpha/r into the up weights, which diffusers needs: docs/io.md).
  const io::TensorFile a = io::read_safetensors(path("a/adapter.safetensors"));
  const io::TensorFile p = io::read_safetensors(path("p.safetensors"));
  ASSERT_EQ(a.tensors.size(), p.tensors.size());
  for (const auto& [k, t] : a.tensors) {
    const Tensor* u = p.find(k);
    ASSERT_NE(u, nullptr) << k;
    if (k.find("lora_A") != std::string::npos) {
      EXPECT_EQ(u->to_vector(), t.to_vector()) << k;
    }
  }
}

TEST_F(Cli, ConvertCustomDiffusionKeepsOutputs) {
  standard_fixtures();
  ASSERT_EQ(train("cd", {"--adapter", "custom_diffusion", "--lr", "0.01"}).code, 0);
  const Tensor want = run("want.safetensors", {"--adapter", path("cd/adapter.safetensors")});
  const Result c = loom({"convert", path("cd/adapter.safetensors"), path("cd.h5"), "--to", "loom"});
  ASSERT_EQ(c.code, 0) << c;
  const Tensor got = run("got.safetensors", {"--adapter", path("cd.h5")});
  ASSERT_TRUE(want.defined() && got.defined());
  EXPECT_LE(rel_error(got, want), 1e-6);
}

TEST_F(Cli, ConvertErrors) {
  standard_fixtures();
  ASSERT_EQ(train("a").code, 0);
  const Result family = loom({"convert", path("a/adapter.safetensors"), path("x.safetensors"), "--to", "foo"});
  EXPECT_EQ(family.code, 2) << family;
  EXPECT_THAT(family.err, AllOf(HasSubstr("--to"), HasSubstr("foo")));
  EXPECT_FALSE(exists(path("x.safetensors")));

  const Result data = loom({"convert", path("data.safetensors"), path("x.safetensors"), "--to", "kohya"});
  EXPECT_EQ(data.code, 3) << data;
  EXPECT_THAT(data.err, HasSubstr("data.safetensors"));
  EXPECT_FALSE(exists(path("x.safetensors")));

  const Result missing = loom({"convert", path("none.safetensors"), path("x.safetensors")});
  EXPECT_EQ(missing.code, 3) << missing;
  EXPECT_THAT(missing.err, HasSubstr("none.safetensors"));

  const Result unwritable =
      loom({"convert", path("a/adapter.safetensors"), path("no/such/dir/x.safetensors"), "--to", "kohya"});
  EXPECT_EQ(unwritable.code, 3) << unwritable;
  EXPECT_THAT(unwritable.err, HasSubstr("x.safetensors"));
}

// ---- gradcheck ------------------------------------------------------------------------------------

// The full table: every op and layer check passes, with rows for the ops and the layers.
TEST_F(Cli, GradcheckPasses) {
  const Result all = loom({"gradcheck"});
  EXPECT_EQ(all.code, 0) << all;
  EXPECT_THAT(all.out, AllOf(HasSubstr("gradient checks passed"), HasSubstr("\nmatmul_2d "),
                             HasSubstr("\nsoftmax_last "), HasSubstr("\nlayer_attention_self "),
                             HasSubstr("\nlayer_attention_lora "), HasSubstr("\nlayer_custom_diffusion ")));
  std::istringstream lines(all.out);
  for (std::string line; std::getline(lines, line);) EXPECT_THAT(line, Not(HasSubstr("FAIL"))) << line;
}

TEST_F(Cli, GradcheckFilter) {
  const Result soft = loom({"gradcheck", "--filter", "softmax"});
  ASSERT_EQ(soft.code, 0) << soft;
  std::istringstream lines(soft.out);
  int rows = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("check ", 0) == 0 || line.find("gradient checks passed") != std::string::npos) continue;
    EXPECT_THAT(line, HasSubstr("softmax"));
    EXPECT_THAT(line, HasSubstr(" ok "));
    ++rows;
  }
  EXPECT_GE(rows, 2);
  EXPECT_THAT(soft.out, HasSubstr(std::to_string(rows) + "/" + std::to_string(rows) + " gradient checks passed"));

  const Result lora = loom({"gradcheck", "--filter", "layer_attention_lora"});
  ASSERT_EQ(lora.code, 0) << lora;
  EXPECT_THAT(lora.out, AllOf(HasSubstr("\nlayer_attention_lora "), HasSubstr("1/1 gradient checks passed")));

  // A filter that selects nothing is a usage error (it used to print "0/0 passed" and exit 0).
  const Result nothing = loom({"gradcheck", "--filter", "no-such-check"});
  EXPECT_EQ(nothing.code, 2) << nothing;
  EXPECT_THAT(nothing.err, HasSubstr("no-such-check"));
}

}  // namespace
}  // namespace loom
