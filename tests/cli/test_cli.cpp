// The `loom` command line (SPEC §6), run as a separate process: every command on good
// input and on each kind of bad input (missing file, wrong flag, corrupt file,
// mismatched adapter), checking the exit code and the message; train → save → run
// round trips; resume equals an uninterrupted run; NaN injection stops with exit code 4
// and leaves the last checkpoint intact (ctest -L cli).
//
// Exit codes: 0 ok, 1 built-in self-check failed, 2 usage, 3 bad or missing input
// file, 4 numerical failure. Fixtures (model directories, data files) are written with
// the library; adapters are made by `loom train` itself.
#include "tests/cli/cli_fixture.h"

namespace loom {
namespace {

// ---- usage and help ---------------------------------------------------------------------------

TEST_F(Cli, HelpForTheProgramAndEverySubcommand) {
  const Result top = loom({"--help"});
  EXPECT_EQ(top.code, 0) << top;
  for (const char* s : {"train", "run", "inspect", "convert", "gradcheck"}) EXPECT_THAT(top.all(), HasSubstr(s));

  const Result train = loom({"train", "--help"});
  EXPECT_EQ(train.code, 0) << train;
  for (const char* f : {"--model", "--data", "--adapter", "--rank", "--alpha", "--targets", "--train-q-out", "--lr",
                        "--optimizer", "--steps", "--batch-size", "--seed", "--scheduler", "--init-adapter", "--out",
                        "--resume"})
    EXPECT_THAT(train.all(), HasSubstr(f)) << "train --help lacks " << f;

  const Result run = loom({"run", "--help"});
  EXPECT_EQ(run.code, 0) << run;
  for (const char* f : {"--model", "--input", "--output", "--adapter", "--prefix", "--backend", "--fuse"})
    EXPECT_THAT(run.all(), HasSubstr(f)) << "run --help lacks " << f;

  const Result inspect = loom({"inspect", "--help"});
  EXPECT_EQ(inspect.code, 0) << inspect;
  EXPECT_THAT(inspect.all(), HasSubstr("file"));

  const Result convert = loom({"convert", "--help"});
  EXPECT_EQ(convert.code, 0) << convert;
  EXPECT_THAT(convert.all(), AllOf(HasSubstr("--to"), HasSubstr("kohya"), HasSubstr("peft")));

  const Result grad = loom({"gradcheck", "--help"});
  EXPECT_EQ(grad.code, 0) << grad;
  EXPECT_THAT(grad.all(), HasSubstr("--filter"));
}

TEST_F(Cli, UsageErrorsExitWithCode2) {
  standard_fixtures();
  const Result none = loom({});
  EXPECT_EQ(none.code, 2) << none;

  const Result unknown_cmd = loom({"frobnicate"});
  EXPECT_EQ(unknown_cmd.code, 2) << unknown_cmd;

  const Result unknown_flag = loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--bogus"});
  EXPECT_EQ(unknown_flag.code, 2) << unknown_flag;
  EXPECT_THAT(unknown_flag.err, HasSubstr("--bogus"));

  const Result bad_value = loom({"train", "--steps", "abc"});
  EXPECT_EQ(bad_value.code, 2) << bad_value;
  EXPECT_THAT(bad_value.err, AllOf(HasSubstr("--steps"), HasSubstr("abc")));

  const Result no_data = loom({"train", "--model", path("model")});
  EXPECT_EQ(no_data.code, 2) << no_data;
  EXPECT_THAT(no_data.err, HasSubstr("--data"));

  const Result no_model = loom({"train", "--data", path("data.safetensors")});
  EXPECT_EQ(no_model.code, 2) << no_model;
  EXPECT_THAT(no_model.err, HasSubstr("--model"));

  const Result optimizer = train("o", {"--optimizer", "foo"});
  EXPECT_EQ(optimizer.code, 2) << optimizer;
  EXPECT_THAT(optimizer.err, AllOf(HasSubstr("--optimizer"), HasSubstr("foo")));

  const Result scheduler = train("o", {"--scheduler", "wobbly"});
  EXPECT_EQ(scheduler.code, 2) << scheduler;
  EXPECT_THAT(scheduler.err, HasSubstr("wobbly"));

  const Result adapter = train("o", {"--adapter", "dora"});
  EXPECT_EQ(adapter.code, 2) << adapter;
  EXPECT_THAT(adapter.err, AllOf(HasSubstr("--adapter"), HasSubstr("dora")));

  const Result steps = train("o", {"--steps", "0"});
  EXPECT_EQ(steps.code, 2) << steps;
  EXPECT_THAT(steps.err, HasSubstr("--steps"));

  const Result rank = train("o", {"--rank", "-1"});
  EXPECT_EQ(rank.code, 2) << rank;
  EXPECT_THAT(rank.err, HasSubstr("--rank"));
  EXPECT_FALSE(exists(path("o/adapter.safetensors")));

  const Result backend = loom({"run", "--model", path("model"), "--input", path("data.safetensors"), "--output",
                               path("out.safetensors"), "--backend", "foo"});
  EXPECT_EQ(backend.code, 2) << backend;
  EXPECT_THAT(backend.err, AllOf(HasSubstr("--backend"), HasSubstr("foo")));
  EXPECT_FALSE(exists(path("out.safetensors")));

  const Result run_no_model =
      loom({"run", "--input", path("data.safetensors"), "--output", path("out.safetensors")});
  EXPECT_EQ(run_no_model.code, 2) << run_no_model;
  EXPECT_THAT(run_no_model.err, HasSubstr("--model"));

  const Result run_batch = loom({"run", "--model", path("model"), "--input", path("data.safetensors"), "--output",
                                 path("out.safetensors"), "--batch-size", "0"});
  EXPECT_EQ(run_batch.code, 2) << run_batch;
  EXPECT_THAT(run_batch.err, HasSubstr("--batch-size"));

  const Result inspect_none = loom({"inspect"});
  EXPECT_EQ(inspect_none.code, 2) << inspect_none;

  const Result convert_one = loom({"convert", path("data.safetensors")});
  EXPECT_EQ(convert_one.code, 2) << convert_one;
}

// ---- train --------------------------------------------------------------------------------------

TEST_F(Cli, TrainWritesAdapterCheckpointAndLossFiles) {
  standard_fixtures();
  const Result r = loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--out", path("out"),
                         "--steps", "5", "--batch-size", "2"});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("trained 5 steps"), HasSubstr("adapter.safetensors"), HasSubstr("checkpoint.h5")));
  // Progress on stderr: step, loss, it/s, ETA.
  EXPECT_THAT(r.err, AllOf(HasSubstr("step 1/5"), HasSubstr("step 5/5"), HasSubstr("loss"), HasSubstr("it/s"),
                           HasSubstr("ETA")));

  ASSERT_TRUE(exists(path("out/adapter.safetensors")));
  ASSERT_TRUE(exists(path("out/checkpoint.h5")));
  const std::string csv = read_bytes(path("out/loss.csv"));
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 6) << csv;  // header + one line per step
  EXPECT_EQ(csv.rfind("step,loss\n", 0), 0u) << csv;
  EXPECT_THAT(csv, HasSubstr("\n5,"));
  const std::string png = read_bytes(path("out/loss.png"));
  ASSERT_GE(png.size(), 8u);
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));

  // The adapter is a PEFT file with lora_A / lora_B of every default target.
  const io::TensorFile f = io::read_safetensors(path("out/adapter.safetensors"));
  EXPECT_EQ(f.tensors.size(), 2u * 4u * 2u);  // (A, B) × 4 targets × (attn1, attn2)
  EXPECT_NE(f.find("unet.transformer_blocks.0.attn2.to_k.lora_A.weight"), nullptr);
  EXPECT_NE(f.find("unet.transformer_blocks.0.attn1.to_out.0.lora_B.weight"), nullptr);
  EXPECT_EQ(f.find("unet.transformer_blocks.0.attn2.to_k.lora_A.weight")->shape(), (Shape{4, 6}));

  // The checkpoint is a loom HDF5 checkpoint at step 5.
  const io::Checkpoint c = io::load_checkpoint(path("out/checkpoint.h5"));
  EXPECT_EQ(c.step, 5);
  EXPECT_EQ(c.adapter_kind, "lora");
  EXPECT_EQ(c.losses.size(), 5u);

  // --quiet: no progress.
  const Result q = train("quiet");
  ASSERT_EQ(q.code, 0) << q;
  EXPECT_THAT(q.err, Not(HasSubstr("it/s")));
}

TEST_F(Cli, TrainIsDeterministicForASeed) {
  standard_fixtures();
  ASSERT_EQ(train("a", {"--seed", "3"}).code, 0);
  ASSERT_EQ(train("b", {"--seed", "3"}).code, 0);
  ASSERT_EQ(train("c", {"--seed", "4"}).code, 0);
  const std::string a = read_bytes(path("a/loss.csv")), b = read_bytes(path("b/loss.csv")), c = read_bytes(path("c/loss.csv"));
  ASSERT_FALSE(a.empty());
  EXPECT_EQ(a, b) << "same seed, different loss curves";
  EXPECT_NE(a, c) << "different seeds, same loss curve";
  EXPECT_EQ(read_bytes(path("a/adapter.safetensors")), read_bytes(path("b/adapter.safetensors")));
}

TEST_F(Cli, TrainOnBadInputFilesExitsWithCode3) {
  standard_fixtures();
  const Result missing = train("o", {}, "model", "nowhere.safetensors");
  EXPECT_EQ(missing.code, 3) << missing;
  EXPECT_THAT(missing.err, HasSubstr("nowhere.safetensors"));

  Generator gen(99);
  std::string noise(4096, '\0');
  for (char& ch : noise) ch = char(gen.next_u64() & 0xff);
  write_bytes(path("noise.safetensors"), noise);
  const Result corrupt = train("o", {}, "model", "noise.safetensors");
  EXPECT_EQ(corrupt.code, 3) << corrupt;
  EXPECT_THAT(corrupt.err, HasSubstr("noise.safetensors"));

  // A safetensors file cut short.
  const std::string good = read_bytes(path("data.safetensors"));
  write_bytes(path("cut.safetensors"), good.substr(0, good.size() / 2));
  const Result cut = train("o", {}, "model", "cut.safetensors");
  EXPECT_EQ(cut.code, 3) << cut;
  EXPECT_THAT(cut.err, HasSubstr("cut.safetensors"));

  write_data(path("notarget.safetensors"), {}, Target::Missing);
  const Result no_target = train("o", {}, "model", "notarget.safetensors");
  EXPECT_EQ(no_target.code, 3) << no_target;
  EXPECT_THAT(no_target.err, AllOf(HasSubstr("notarget.safetensors"), HasSubstr("'target'")));

  // Data for another model (8 channels expected, 4 given).
  ModelSpec other;
  other.in_channels = 4;
  write_data(path("other.safetensors"), other);
  const Result wrong_shape = train("o", {}, "model", "other.safetensors");
  EXPECT_EQ(wrong_shape.code, 3) << wrong_shape;
  EXPECT_THAT(wrong_shape.err, HasSubstr("channels"));

  fs::create_directories(path("noconfig"));
  fs::copy_file(path("model/model.safetensors"), path("noconfig/model.safetensors"));
  const Result no_config = train("o", {}, "noconfig");
  EXPECT_EQ(no_config.code, 3) << no_config;
  EXPECT_THAT(no_config.err, HasSubstr("config.json"));

  fs::create_directories(path("noweights"));
  fs::copy_file(path("model/config.json"), path("noweights/config.json"));
  const Result no_weights = train("o", {}, "noweights");
  EXPECT_EQ(no_weights.code, 3) << no_weights;
  EXPECT_THAT(no_weights.err, HasSubstr("model.safetensors"));

  fs::create_directories(path("badconfig"));
  fs::copy_file(path("model/model.safetensors"), path("badconfig/model.safetensors"));
  write_bytes(path("badconfig/config.json"), R"({"in_channels": 8, "num_attention_heads": 2})");
  const Result bad_config = train("o", {}, "badconfig");
  EXPECT_EQ(bad_config.code, 3) << bad_config;
  EXPECT_THAT(bad_config.err, AllOf(HasSubstr("config.json"), HasSubstr("attention_head_dim")));

  const Result no_ckpt =
      loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--resume", path("nothing-here")});
  EXPECT_EQ(no_ckpt.code, 3) << no_ckpt;
  EXPECT_THAT(no_ckpt.err, HasSubstr("checkpoint.h5"));

  EXPECT_FALSE(exists(path("o/adapter.safetensors")));
}

TEST_F(Cli, ResumeEqualsAnUninterruptedRun) {
  standard_fixtures();
  const std::vector<std::string> common{"--model", path("model"), "--data", path("data.safetensors"), "--batch-size",
                                        "2", "--seed", "5", "--quiet", "--lr", "0.01"};
  auto with = [&](std::vector<std::string> head) {
    head.insert(head.begin(), "train");
    head.insert(head.end(), common.begin(), common.end());
    return head;
  };
  const Result straight = loom(with({"--out", path("straight"), "--steps", "8"}));
  ASSERT_EQ(straight.code, 0) << straight;
  const Result first = loom(with({"--out", path("split"), "--steps", "4"}));
  ASSERT_EQ(first.code, 0) << first;
  EXPECT_EQ(io::load_checkpoint(path("split/checkpoint.h5")).step, 4);
  const Result rest = loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--resume",
                            path("split"), "--steps", "8", "--quiet"});
  ASSERT_EQ(rest.code, 0) << rest;
  EXPECT_THAT(rest.out, HasSubstr(path("split") + "/adapter.safetensors"));

  EXPECT_EQ(read_bytes(path("split/loss.csv")), read_bytes(path("straight/loss.csv")));
  const io::TensorFile a = io::read_safetensors(path("split/adapter.safetensors"));
  const io::TensorFile b = io::read_safetensors(path("straight/adapter.safetensors"));
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  ASSERT_FALSE(a.tensors.empty());
  for (const auto& [name, t] : b.tensors) {
    const Tensor* u = a.find(name);
    ASSERT_NE(u, nullptr) << name;
    EXPECT_EQ(u->shape(), t.shape()) << name;
    EXPECT_EQ(u->to_vector(), t.to_vector()) << name;
  }
  EXPECT_EQ(io::load_checkpoint(path("split/checkpoint.h5")).step, 8);
}

TEST_F(Cli, ResumeWithoutDataIsAUsageError) {
  standard_fixtures();
  ASSERT_EQ(train("run1").code, 0);
  // train.cpp: "--resume needs --model and --data too" (exit 2, naming --data).
  const Result r = loom({"train", "--model", path("model"), "--resume", path("run1"), "--steps", "8"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--data"));
}

TEST_F(Cli, NonFiniteLossStopsWithCode4NamingTheStep) {
  standard_fixtures();
  write_data(path("overflow.safetensors"), {}, Target::Overflow);
  const Result r = train("o", {}, "model", "overflow.safetensors");
  EXPECT_EQ(r.code, 4) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("step 1"), HasSubstr("not finite")));
  EXPECT_FALSE(exists(path("o/adapter.safetensors")));
  EXPECT_FALSE(exists(path("o/checkpoint.h5")));
  EXPECT_FALSE(exists(path("o/loss.csv")));

  // A learning rate that blows the adapter up: step 1 is fine, step 2 is not.
  const Result blowup = train("lr", {"--lr", "1e30"});
  EXPECT_EQ(blowup.code, 4) << blowup;
  EXPECT_THAT(blowup.err, HasSubstr("step 2"));
  EXPECT_FALSE(exists(path("lr/adapter.safetensors")));
}

TEST_F(Cli, NonFiniteLossOnResumeLeavesTheLastCheckpointIntact) {
  standard_fixtures();
  write_data(path("overflow.safetensors"), {}, Target::Overflow);
  const Result good = loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--out",
                            path("run"), "--steps", "3", "--batch-size", "2", "--quiet"});
  ASSERT_EQ(good.code, 0) << good;
  const std::string ckpt = read_bytes(path("run/checkpoint.h5")), adapter = read_bytes(path("run/adapter.safetensors"));
  const std::string csv = read_bytes(path("run/loss.csv")), png = read_bytes(path("run/loss.png"));
  ASSERT_FALSE(ckpt.empty());
  ASSERT_FALSE(adapter.empty());

  const Result bad = loom({"train", "--model", path("model"), "--data", path("overflow.safetensors"), "--resume",
                           path("run"), "--steps", "6", "--quiet"});
  EXPECT_EQ(bad.code, 4) << bad;
  EXPECT_THAT(bad.err, HasSubstr("step 4"));
  EXPECT_EQ(read_bytes(path("run/checkpoint.h5")), ckpt) << "checkpoint.h5 changed by the failed run";
  EXPECT_EQ(read_bytes(path("run/adapter.safetensors")), adapter) << "adapter.safetensors changed by the failed run";
  EXPECT_EQ(read_bytes(path("run/loss.csv")), csv);
  EXPECT_EQ(read_bytes(path("run/loss.png")), png);
  // No temporary files left behind by the atomic writers (.lock is the output directory's lock).
  for (const auto& e : fs::directory_iterator(path("run")))
    EXPECT_THAT(e.path().filename().string(),
                ::testing::AnyOf("checkpoint.h5", "adapter.safetensors", "loss.csv", "loss.png", ".lock"));
  // The checkpoint still resumes.
  const Result again = loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--resume",
                             path("run"), "--steps", "4", "--quiet"});
  EXPECT_EQ(again.code, 0) << again;
}

TEST_F(Cli, TrainFromAnInitAdapter) {
  standard_fixtures();
  ASSERT_EQ(train("first", {"--lr", "0.02"}).code, 0);
  const Result r = train("second", {"--init-adapter", path("first/adapter.safetensors")});
  ASSERT_EQ(r.code, 0) << r;
  const Result fresh = train("fresh");
  ASSERT_EQ(fresh.code, 0) << fresh;
  // Starting from a trained adapter, the first loss is not the base model's.
  const std::string a = read_bytes(path("second/loss.csv")), b = read_bytes(path("fresh/loss.csv"));
  EXPECT_NE(a.substr(0, a.find('\n', 10)), b.substr(0, b.find('\n', 10)));

  const Result missing = train("third", {"--init-adapter", path("none.safetensors")});
  EXPECT_EQ(missing.code, 3) << missing;
  EXPECT_THAT(missing.err, HasSubstr("none.safetensors"));
}

TEST_F(Cli, TrainCustomDiffusion) {
  standard_fixtures();
  const Result r = train("cd", {"--adapter", "custom_diffusion", "--lr", "0.01"});
  ASSERT_EQ(r.code, 0) << r;
  const io::TensorFile f = io::read_safetensors(path("cd/adapter.safetensors"));
  ASSERT_FALSE(f.tensors.empty());
  for (const auto& [k, t] : f.tensors) EXPECT_THAT(k, HasSubstr("_custom_diffusion")) << k;
  EXPECT_NE(f.find("transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight"), nullptr);
  EXPECT_EQ(f.find("transformer_blocks.0.attn2.processor.to_q_custom_diffusion.weight"), nullptr);  // crossattn_kv
  EXPECT_EQ(io::load_checkpoint(path("cd/checkpoint.h5")).adapter_kind, "custom_diffusion");
  EXPECT_EQ(read_bytes(path("cd/loss.csv")).size() > 0, true);

  const Result q = train("cdq", {"--adapter", "custom_diffusion", "--train-q-out"});
  ASSERT_EQ(q.code, 0) << q;
  const io::TensorFile g = io::read_safetensors(path("cdq/adapter.safetensors"));
  EXPECT_NE(g.find("transformer_blocks.0.attn2.processor.to_q_custom_diffusion.weight"), nullptr);
  EXPECT_NE(g.find("transformer_blocks.0.attn2.processor.to_out_custom_diffusion.0.weight"), nullptr);

  // Loaded by `loom run`: changes the output.
  const Tensor base = run("base.safetensors");
  const Tensor with = run("cd.safetensors", {"--adapter", path("cd/adapter.safetensors")});
  ASSERT_TRUE(base.defined() && with.defined());
  EXPECT_GT(rel_error(with, base), 1e-4);

  const Result inspect = loom({"inspect", path("cd/adapter.safetensors")});
  EXPECT_EQ(inspect.code, 0) << inspect;
  EXPECT_THAT(inspect.out, HasSubstr("custom-diffusion"));
}

// The built-in task: no files needed. Either outcome of the self-check is accepted here
// (the default number of steps is what it is tuned for); the report lines must be there.
TEST_F(Cli, BuiltinTaskLora) {
  const Result r = loom({"train", "--steps", "60", "--out", path("builtin"), "--quiet"});
  EXPECT_THAT(r.code, ::testing::AnyOf(0, 1)) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("start loss"), HasSubstr("final loss"), HasSubstr("recovered"),
                           HasSubstr("reload check"), HasSubstr("built-in task: ")));
  EXPECT_THAT(r.out, HasSubstr(r.code == 0 ? "PASSED" : "FAILED"));
  EXPECT_THAT(r.out, HasSubstr("reload check"));
  EXPECT_THAT(r.out, HasSubstr(": ok"));  // the reloaded adapter reproduces the outputs at any step count
  EXPECT_TRUE(exists(path("builtin/adapter.safetensors")));
  EXPECT_TRUE(exists(path("builtin/checkpoint.h5")));
  const std::string csv = read_bytes(path("builtin/loss.csv"));
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 61);
  // What it says to try next works.
  const std::string hint = r.out.substr(r.out.find("try: loom run"));
  EXPECT_THAT(hint, HasSubstr("--model"));
}

TEST_F(Cli, BuiltinTaskCustomDiffusion) {
  const Result r = loom({"train", "--adapter", "custom_diffusion", "--steps", "40", "--out", path("builtin"), "--quiet"});
  EXPECT_THAT(r.code, ::testing::AnyOf(0, 1)) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("Custom Diffusion"), HasSubstr("start loss"), HasSubstr("final loss"),
                           HasSubstr("recovered"), HasSubstr("reload check")));
  EXPECT_TRUE(exists(path("builtin/adapter.safetensors")));

  const Result bad = loom({"train", "--adapter", "dora", "--steps", "2", "--out", path("x")});
  EXPECT_EQ(bad.code, 2) << bad;
  EXPECT_THAT(bad.err, HasSubstr("dora"));
}

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
