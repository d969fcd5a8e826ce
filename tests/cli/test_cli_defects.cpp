// Regression tests for the defects found by trying loom as a new user would (issue 12):
// exceptions outside loom's own errors, nonsense configs and ranks, flag errors, the
// built-in task's flags, temporary files on SIGTERM/SIGINT and stale ones, two writers in one
// --out, resume semantics, exit codes of numerical failures, gradcheck filters, inspecting a
// checkpoint, and the loss plot's size (ctest -L cli).
#include <signal.h>
#include <sys/file.h>

#include <nlohmann/json.hpp>

#include "tests/cli/cli_fixture.h"
#include "trainer/trainer.h"

namespace loom {
namespace {

using ::testing::AnyOf;

// The fixture of tests/cli/cli_fixture.h under a suite name of its own (the fixture class of
// each translation unit is a distinct class, and a GoogleTest suite needs one).
class CliDefects : public Cli {};

// A model directory whose config.json is `config` (no weights needed: the config is read first).
void write_config_dir(const std::string& dir, const std::string& config) {
  fs::create_directories(dir);
  write_bytes(dir + "/config.json", config);
}

std::string config_with(const std::string& extra) {
  return R"({"in_channels": 8, "num_attention_heads": 2, "attention_head_dim": 4, "cross_attention_dim": 6,
            "norm_num_groups": 2)" + extra + "}";
}

// Names in `dir` that look like temporary files of atomic writes (".NAME.tmp.PID").
std::vector<std::string> temp_files_in(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.find(".tmp.") != std::string::npos) out.push_back(name);
  }
  return out;
}

trainer::TrainOptions checkpoint_options(const std::string& path) {
  return trainer::TrainOptions::from_json(io::load_checkpoint(path).options_json);
}

// A `loom` child process stopped inside the save of a file whose path contains `name` (the
// LOOM_TEST_HOLD_SAVE_FD hook: the child writes the temporary file's path into a pipe, then
// waits for a signal). No sleeping: the test blocks on the pipe until the child is there.
struct HeldRun {
  pid_t pid = -1;
  std::string temp_path;  // empty when the child ended without reaching the save

  HeldRun(const std::vector<std::string>& args, const std::string& name, const std::string& scratch) {
    int fds[2];
    if (::pipe(fds) != 0) return;
    std::vector<std::string> all{LOOM_BIN};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : all) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::vector<std::string> env{"LOOM_TEST_HOLD_SAVE_FD=" + std::to_string(fds[1]), "LOOM_TEST_HOLD_SAVE_NAME=" + name};
    std::vector<char*> envp;
    for (auto& e : env) envp.push_back(e.data());
    for (char** e = environ; *e; ++e) envp.push_back(*e);
    envp.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, (scratch + "/.held.out").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, 2, (scratch + "/.held.err").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    const int rc = posix_spawn(&pid, LOOM_BIN, &actions, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    ::close(fds[1]);
    if (rc != 0) {
      pid = -1;
      ::close(fds[0]);
      return;
    }
    // Blocks until the child has written the line, or has ended (EOF).
    char c;
    while (::read(fds[0], &c, 1) == 1 && c != '\n') temp_path.push_back(c);
    ::close(fds[0]);
  }
  // Sends `sig` and waits; returns the signal that ended the child (0 if it exited).
  int stop(int sig) {
    ::kill(pid, sig);
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    pid = -1;
    return WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  }
  ~HeldRun() {
    if (pid > 0) stop(SIGKILL);
  }
};

// ---- exceptions that are not loom errors ----------------------------------------------------------

TEST_F(CliDefects, OutOfMemoryAndOtherExceptionsGetAMessageAndExitCode3) {
  standard_fixtures();
  const Result oom = loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--out", path("o")},
                          {"LOOM_TEST_FAULT=bad_alloc"});
  EXPECT_EQ(oom.code, 3) << oom;  // not 134 (SIGABRT)
  EXPECT_THAT(oom.err, AllOf(HasSubstr("out of memory"), HasSubstr("loading the model directory " + path("model"))));

  const Result other = loom({"run", "--model", path("model"), "--input", path("data.safetensors"), "--output",
                             path("out.safetensors")},
                            {"LOOM_TEST_FAULT=logic_error"});
  EXPECT_EQ(other.code, 3) << other;
  EXPECT_THAT(other.err, AllOf(HasSubstr("unexpected error"), HasSubstr("test fault")));
  EXPECT_FALSE(exists(path("out.safetensors")));
}

// ---- nonsense configs and ranks ---------------------------------------------------------------------

TEST_F(CliDefects, ConfigSizesThatCannotBeAllocatedAreNamedErrors) {
  standard_fixtures();
  write_config_dir(path("huge_heads"),
                   R"({"in_channels": 8, "num_attention_heads": 2147483648, "attention_head_dim": 4, "norm_num_groups": 2})");
  write_config_dir(path("huge_dim"),
                   R"({"in_channels": 8, "num_attention_heads": 2, "attention_head_dim": 2147483648, "norm_num_groups": 2})");
  write_config_dir(path("many_heads"),
                   R"({"in_channels": 8, "num_attention_heads": 65536, "attention_head_dim": 8, "norm_num_groups": 2})");
  for (const auto& [dir, key] : std::vector<std::pair<std::string, std::string>>{
           {"huge_heads", "num_attention_heads"}, {"huge_dim", "attention_head_dim"}, {"many_heads", "num_attention_heads"}}) {
    const Result t = train("o", {}, dir);
    EXPECT_EQ(t.code, 3) << t;
    EXPECT_THAT(t.err, AllOf(HasSubstr(path(dir) + "/config.json"), HasSubstr(key)));
    const Result r = loom({"run", "--model", path(dir), "--input", path("data.safetensors"), "--output", path("x.st")});
    EXPECT_EQ(r.code, 3) << r;
    EXPECT_THAT(r.err, AllOf(HasSubstr("config.json"), HasSubstr(key)));
  }
  EXPECT_FALSE(exists(path("o/adapter.safetensors")));
}

TEST_F(CliDefects, RankAboveWhatAModuleAllowsIsAUsageError) {
  standard_fixtures();
  // attn2.to_k maps cross_attention_dim 6 to 8: rank ≤ 6.
  for (const char* rank : {"10000000", "7"}) {
    const Result r = train("o", {"--rank", rank});
    EXPECT_EQ(r.code, 2) << r;
    EXPECT_THAT(r.err, AllOf(HasSubstr("--rank " + std::string(rank)), HasSubstr("rank ≤ 6")));
  }
  EXPECT_FALSE(exists(path("o/adapter.safetensors")));
  EXPECT_EQ(train("ok", {"--rank", "6"}).code, 0);
}

TEST_F(CliDefects, BadConfigValuesNameTheFileAndTheKey) {
  standard_fixtures();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"(, "out_channels": 0)", "out_channels"},        {R"(, "out_channels": -3)", "out_channels"},
      {R"(, "activation_fn": "relu")", "activation_fn"}, {R"(, "norm_eps": -1)", "norm_eps"},
      {R"(, "norm_eps": 0)", "norm_eps"},                {R"(, "dropout": 1.5)", "dropout"},
      {R"(, "dropout": -0.1)", "dropout"}};
  for (const auto& [extra, key] : cases) {
    std::string text = config_with(extra);
    write_config_dir(path("bad"), text);
    fs::copy_file(path("model/model.safetensors"), path("bad/model.safetensors"), fs::copy_options::overwrite_existing);
    const Result r = train("o", {}, "bad");
    EXPECT_EQ(r.code, 3) << extra << "\n" << r;
    EXPECT_THAT(r.err, AllOf(HasSubstr(path("bad") + "/config.json"), HasSubstr("'" + key + "'"))) << extra;
  }
  write_config_dir(path("bad_cross"), R"({"in_channels": 8, "num_attention_heads": 2, "attention_head_dim": 4,
                                         "cross_attention_dim": 0, "norm_num_groups": 2})");
  const Result cross = train("o", {}, "bad_cross");
  EXPECT_EQ(cross.code, 3) << cross;
  EXPECT_THAT(cross.err, AllOf(HasSubstr("config.json"), HasSubstr("'cross_attention_dim'")));

  fs::create_directories(path("dir_config/config.json"));
  fs::copy_file(path("model/model.safetensors"), path("dir_config/model.safetensors"));
  const Result dir = train("o", {}, "dir_config");
  EXPECT_EQ(dir.code, 3) << dir;
  EXPECT_THAT(dir.err, AllOf(HasSubstr("config.json"), HasSubstr("is a directory")));
  EXPECT_THAT(dir.err, Not(HasSubstr("JSON (")));
}

TEST_F(CliDefects, DataWithoutContextForACrossAttentionModelNamesTheMissingTensor) {
  standard_fixtures();
  Generator gen(3);
  const Tensor hs = Tensor::randn({6, 8, 4, 4}, gen);
  io::write_safetensors(path("nocontext.safetensors"), {{"hidden_states", hs}, {"target", hs}});
  const Result t = train("o", {}, "model", "nocontext.safetensors");
  EXPECT_EQ(t.code, 3) << t;
  EXPECT_THAT(t.err, AllOf(HasSubstr(path("nocontext.safetensors")), HasSubstr("missing tensor 'encoder_hidden_states'")));
  EXPECT_THAT(t.err, Not(HasSubstr("Linear")));
  const Result r = loom({"run", "--model", path("model"), "--input", path("nocontext.safetensors"), "--output",
                         path("out.safetensors")});
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr(path("nocontext.safetensors")), HasSubstr("encoder_hidden_states")));
}

// ---- flag errors ------------------------------------------------------------------------------------------

TEST_F(CliDefects, AdapterWeightsMustBeFiniteNumbers) {
  standard_fixtures();
  for (const char* weight : {"abc", "inf", "nan", "-inf", ""}) {
    const Result r = loom({"run", "--model", path("model"), "--input", path("data.safetensors"), "--output",
                           path("out.safetensors"), "--adapter", path("a.safetensors") + ":" + weight});
    EXPECT_EQ(r.code, 2) << weight << "\n" << r;
    EXPECT_THAT(r.err, AllOf(HasSubstr("--adapter"), HasSubstr("not a finite number"))) << weight;
  }
  EXPECT_FALSE(exists(path("out.safetensors")));
}

TEST_F(CliDefects, CustomDiffusionGivenAWeightIsAUsageError) {
  standard_fixtures();
  ASSERT_EQ(train("cd", {"--adapter", "custom_diffusion"}).code, 0);
  const Result r = loom({"run", "--model", path("model"), "--input", path("data.safetensors"), "--output",
                         path("out.safetensors"), "--adapter", path("cd/adapter.safetensors") + ":0.5"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("--adapter"), HasSubstr("take no weight")));
}

TEST_F(CliDefects, NegativeSeedIsRefused) {
  standard_fixtures();
  const Result r = train("o", {"--seed", "-1"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--seed"));
  const Result builtin = loom({"train", "--seed", "-1", "--out", path("b")});
  EXPECT_EQ(builtin.code, 2) << builtin;
  EXPECT_FALSE(exists(path("o/adapter.safetensors")));
}

TEST_F(CliDefects, OutputThatIsTheInputIsRefused) {
  standard_fixtures();
  const std::string before = read_bytes(path("data.safetensors"));
  fs::create_symlink(path("data.safetensors"), path("link.safetensors"));
  for (const std::string& output : {path("data.safetensors"), path("model/../data.safetensors"),
                                    dir_ + "/./data.safetensors", path("link.safetensors")}) {
    const Result r = loom({"run", "--model", path("model"), "--input", path("data.safetensors"), "--output", output});
    EXPECT_EQ(r.code, 2) << output << "\n" << r;
    EXPECT_THAT(r.err, AllOf(HasSubstr("--output"), HasSubstr("--input"))) << output;
  }
  EXPECT_EQ(read_bytes(path("data.safetensors")), before) << "the data file was replaced";
}

// ---- the built-in task's flags ----------------------------------------------------------------------------

TEST_F(CliDefects, BuiltinTaskValidatesEveryFlag) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--steps", "0"}, "--steps"},          {{"--rank", "0"}, "--rank"},
      {{"--lr", "nan"}, "--lr"},              {{"--optimizer", "foo"}, "--optimizer"},
      {{"--batch-size", "0"}, "--batch-size"}, {{"--checkpoint-every", "-5"}, "--checkpoint-every"},
      {{"--init-adapter", "/nonexistent"}, "--init-adapter"}, {{"--scheduler", "linear"}, "--scheduler"}};
  for (const auto& [flags, name] : cases) {
    std::vector<std::string> args{"train", "--out", path("b"), "--quiet"};
    args.insert(args.end(), flags.begin(), flags.end());
    const Result r = loom(args);
    EXPECT_EQ(r.code, 2) << flags[0] << "\n" << r;
    EXPECT_THAT(r.err, HasSubstr(name));
    EXPECT_FALSE(exists(path("b"))) << "the built-in task started despite " << flags[0];
  }
}

TEST_F(CliDefects, BuiltinTaskUsesStepsRankLrOptimizerAndSeed) {
  const Result r = loom({"train", "--steps", "3", "--rank", "2", "--lr", "0.005", "--optimizer", "sgd", "--seed", "9",
                         "--out", path("b"), "--quiet"});
  EXPECT_THAT(r.code, AnyOf(0, 1)) << r;
  const trainer::TrainOptions o = checkpoint_options(path("b/checkpoint.h5"));
  EXPECT_EQ(o.steps, 3);
  EXPECT_EQ(o.rank, 2);
  EXPECT_EQ(o.lr, 0.005);
  EXPECT_EQ(o.optimizer, "sgd");
  EXPECT_EQ(o.seed, 9u);
}

// ---- temporary files --------------------------------------------------------------------------------------

TEST_F(CliDefects, SigtermOrSigintDuringASaveRemovesTheTemporaryFile) {
  standard_fixtures();
  for (const auto& [name, sig] : std::vector<std::pair<std::string, int>>{{"checkpoint.h5", SIGTERM},
                                                                          {"adapter.safetensors", SIGINT}}) {
    const std::string out = path("held_" + name);
    HeldRun run({"train", "--model", path("model"), "--data", path("data.safetensors"), "--out", out, "--steps", "2",
                 "--quiet"},
                name, dir_);
    ASSERT_FALSE(run.temp_path.empty()) << "the child never reached the save of " << name << ":\n"
                                        << read_bytes(dir_ + "/.held.err");
    EXPECT_THAT(run.temp_path, HasSubstr("/." + name + ".tmp."));
    EXPECT_TRUE(exists(run.temp_path));
    // Meanwhile the directory is locked: a second run into it is refused.
    const Result second = train("held_" + name);
    EXPECT_EQ(second.code, 2) << second;
    EXPECT_THAT(second.err, HasSubstr("another loom run"));

    EXPECT_EQ(run.stop(sig), sig) << "the run should end by the signal it got";
    EXPECT_FALSE(exists(run.temp_path)) << run.temp_path << " left behind";
    EXPECT_THAT(temp_files_in(out), ::testing::IsEmpty());
  }
}

TEST_F(CliDefects, StaleTemporaryFilesOfDeadProcessesAreRemovedAtStart) {
  standard_fixtures();
  const pid_t dead = ::fork();
  if (dead == 0) ::_exit(0);
  ASSERT_GT(dead, 0);
  ASSERT_EQ(::waitpid(dead, nullptr, 0), dead);  // reaped: no process has this pid now
  fs::create_directories(path("o"));
  const std::string stale = ".checkpoint.h5.tmp." + std::to_string(dead), stale2 = stale + ".3";
  const std::string live = ".adapter.safetensors.tmp." + std::to_string(::getpid());
  for (const auto& n : {stale, stale2, live}) write_bytes(path("o/" + n), "partial");
  const Result r = train("o");
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_FALSE(exists(path("o/" + stale)));
  EXPECT_FALSE(exists(path("o/" + stale2)));
  EXPECT_TRUE(exists(path("o/" + live))) << "a temporary file of a running process was removed";
  EXPECT_THAT(r.err, AllOf(HasSubstr("removed"), HasSubstr(stale)));
}

// ---- one writer per --out ---------------------------------------------------------------------------------

TEST_F(CliDefects, ASecondWriterIntoTheSameOutIsRefused) {
  standard_fixtures();
  fs::create_directories(path("o"));
  // Another run holding the lock (this process, as far as the child can tell).
  const int fd = ::open(path("o/.lock").c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);
  ASSERT_EQ(::write(fd, "12345\n", 6), 6);
  const Result r = train("o");
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr(path("o")), HasSubstr("another loom run"), HasSubstr("pid 12345")));
  EXPECT_FALSE(exists(path("o/adapter.safetensors")));
  ::close(fd);  // released: the next run goes ahead
  EXPECT_EQ(train("o").code, 0);
}

// ---- resume -------------------------------------------------------------------------------------------------

// `train` with the options of the resume tests (a cosine schedule, checkpoints every 4 steps).
std::vector<std::string> resume_run_args(const CliDefects& t, const std::string& out, const std::string& steps,
                                         const std::string& scheduler) {
  (void)t;
  return {"--out", out, "--steps", steps, "--batch-size", "2", "--seed", "5", "--lr", "0.01", "--scheduler", scheduler,
          "--warmup-steps", "1", "--checkpoint-every", "4", "--quiet"};
}

TEST_F(CliDefects, AResumeContinuesThePlannedRun) {
  standard_fixtures();
  const std::vector<std::string> base{"train", "--model", path("model"), "--data", path("data.safetensors")};
  auto args = [&](std::vector<std::string> tail) {
    std::vector<std::string> a = base;
    a.insert(a.end(), tail.begin(), tail.end());
    return a;
  };
  const Result straight = loom(args(resume_run_args(*this, path("straight"), "8", "cosine")));
  ASSERT_EQ(straight.code, 0) << straight;
  // The same run, stopped by SIGTERM while it writes loss.png at step 4 (checkpoint.h5 of step 4 is complete).
  {
    HeldRun held(args(resume_run_args(*this, path("split"), "8", "cosine")), "loss.png", dir_);
    ASSERT_FALSE(held.temp_path.empty()) << read_bytes(dir_ + "/.held.err");
    EXPECT_EQ(held.stop(SIGTERM), SIGTERM);
  }
  ASSERT_EQ(io::load_checkpoint(path("split/checkpoint.h5")).step, 4);
  // No --steps: to the planned 8, bit for bit as the uninterrupted run.
  const Result rest = loom(args({"--resume", path("split"), "--quiet"}));
  ASSERT_EQ(rest.code, 0) << rest;
  EXPECT_EQ(io::load_checkpoint(path("split/checkpoint.h5")).step, 8);
  EXPECT_EQ(read_bytes(path("split/loss.csv")), read_bytes(path("straight/loss.csv")));
  EXPECT_EQ(read_bytes(path("split/adapter.safetensors")), read_bytes(path("straight/adapter.safetensors")));

  // Nothing left to do: a resume of a finished run, or one asked to go backwards.
  for (const std::vector<std::string>& extra : {std::vector<std::string>{}, std::vector<std::string>{"--steps", "6"}}) {
    std::vector<std::string> a = args({"--resume", path("split"), "--quiet"});
    a.insert(a.end(), extra.begin(), extra.end());
    const Result done = loom(a);
    EXPECT_EQ(done.code, 2) << done;
    EXPECT_THAT(done.err, AllOf(HasSubstr("at step 8 already"), HasSubstr("larger --steps")));
  }
}

TEST_F(CliDefects, ExtendingARunSaysHowTheScheduleIsExtended) {
  standard_fixtures();
  const std::vector<std::string> base{"train", "--model", path("model"), "--data", path("data.safetensors")};
  auto args = [&](std::vector<std::string> tail) {
    std::vector<std::string> a = base;
    a.insert(a.end(), tail.begin(), tail.end());
    return a;
  };
  // Constant: extending 4 → 8 equals a run planned for 8.
  ASSERT_EQ(loom(args(resume_run_args(*this, path("c8"), "8", "constant"))).code, 0);
  ASSERT_EQ(loom(args(resume_run_args(*this, path("c4"), "4", "constant"))).code, 0);
  const Result ext = loom(args({"--resume", path("c4"), "--steps", "8", "--quiet"}));
  ASSERT_EQ(ext.code, 0) << ext;
  EXPECT_THAT(ext.err, AllOf(HasSubstr("from 4 to 8 steps"), HasSubstr("constant schedule continues")));
  EXPECT_EQ(read_bytes(path("c4/loss.csv")), read_bytes(path("c8/loss.csv")));

  // Cosine: the schedule keeps its planned 4 steps and holds the LR of its last step.
  ASSERT_EQ(loom(args(resume_run_args(*this, path("cos"), "4", "cosine"))).code, 0);
  const Result cos = loom(args({"--resume", path("cos"), "--steps", "8", "--quiet"}));
  ASSERT_EQ(cos.code, 0) << cos;
  EXPECT_THAT(cos.err, AllOf(HasSubstr("from 4 to 8 steps"), HasSubstr("keeps its planned length of 4 steps"),
                             HasSubstr("hold its final learning rate")));
  const trainer::TrainOptions o = checkpoint_options(path("cos/checkpoint.h5"));
  EXPECT_EQ(o.steps, 8);
  EXPECT_EQ(o.schedule_steps, 4);
  EXPECT_EQ(io::load_checkpoint(path("cos/checkpoint.h5")).losses.size(), 8u);
}

TEST_F(CliDefects, FlagsThatAResumeCannotHonourAreRefused) {
  standard_fixtures();
  ASSERT_EQ(train("run1").code, 0);
  const std::string ckpt = read_bytes(path("run1/checkpoint.h5"));
  for (const std::vector<std::string>& flag : {std::vector<std::string>{"--lr", "0.5"}, {"--optimizer", "sgd"},
                                               {"--batch-size", "3"}, {"--scheduler", "cosine"}, {"--rank", "2"}}) {
    std::vector<std::string> a{"train", "--model", path("model"), "--data", path("data.safetensors"), "--resume",
                               path("run1"), "--steps", "9", "--quiet"};
    a.insert(a.end(), flag.begin(), flag.end());
    const Result r = loom(a);
    EXPECT_EQ(r.code, 2) << flag[0] << "\n" << r;
    EXPECT_THAT(r.err, AllOf(HasSubstr(flag[0] + " cannot be given with --resume"), HasSubstr("--init-adapter")));
  }
  EXPECT_EQ(read_bytes(path("run1/checkpoint.h5")), ckpt);
}

// ---- exit codes -----------------------------------------------------------------------------------------------

TEST_F(CliDefects, NonFiniteWeightsAfterAFiniteLossAreANumericalFailure) {
  standard_fixtures();
  // An LR beyond the f32 range: the step-1 loss is finite, the updated weights are not.
  const Result r = train("o", {"--lr", "1e39"});
  EXPECT_EQ(r.code, 4) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("step 1"), HasSubstr("NaN or Inf"), HasSubstr("loss was finite")));
  EXPECT_FALSE(exists(path("o/adapter.safetensors")));
}

TEST_F(CliDefects, GradcheckFilterThatSelectsNothingIsAUsageError) {
  const Result r = loom({"gradcheck", "--filter", "nosuch"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("--filter"), HasSubstr("nosuch")));
}

TEST_F(CliDefects, InspectSaysACheckpointIsACheckpoint) {
  standard_fixtures();
  ASSERT_EQ(train("o", {"--optimizer", "adam", "--rank", "3"}).code, 0);
  const Result r = loom({"inspect", path("o/checkpoint.h5")});
  EXPECT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("training checkpoint"), HasSubstr("step     6 of 6 planned"),
                           HasSubstr("adapter  lora"), HasSubstr("rank 3"), HasSubstr("optimizer adam")));
  EXPECT_THAT(r.out, Not(HasSubstr("family")));
}

// ---- the loss plot --------------------------------------------------------------------------------------------

TEST_F(CliDefects, LossPlotIsASmallPng) {
  standard_fixtures();
  const Result r = loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--out", path("o"),
                         "--steps", "40", "--checkpoint-every", "10", "--quiet"});
  ASSERT_EQ(r.code, 0) << r;
  const std::string png = read_bytes(path("o/loss.png"));
  ASSERT_GT(png.size(), 8u);
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_LT(png.size(), 30000u) << "loss.png is " << png.size() << " bytes (uncompressed it was 691 KB)";
}

}  // namespace
}  // namespace loom
