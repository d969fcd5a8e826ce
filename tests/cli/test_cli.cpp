// The `loom` command line (SPEC §6) run as a separate process: help, usage errors (exit 2) and `loom train`.
//
// Every command on good input and on each kind of bad input, checking the exit code and the
// message; resume equals an uninterrupted run; NaN injection stops with exit code 4 and leaves the
// last checkpoint intact. `loom run`, `inspect`, `convert` and `gradcheck`: test_cli_run_convert.cpp
// (ctest -L cli).
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

}  // namespace
}  // namespace loom
