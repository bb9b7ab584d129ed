//! Pipeline files: the YAML schema, loading, and validation with file:line:column errors.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Deserialize;

use nanochat_artifacts::stage::is_valid_name;

/// A validation error pointing into the pipeline file.
#[derive(Debug)]
pub struct PipelineError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for PipelineError {}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    /// Optional name; defaults to the file stem.
    #[serde(default)]
    name: Option<String>,
    /// Optional free-text description.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    stages: BTreeMap<String, StageFile>,
    /// What `nanochat-run serve --pipeline` starts.
    #[serde(default)]
    serve: Option<ServeFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    stage: String,
    #[serde(default)]
    config: Option<String>,
    #[serde(default)]
    args: Vec<String>,
}

/// Data a stage reads from outside the store, and how to get it (shown by `--dry-run`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Need {
    /// A file or directory, relative to where nanochat-run runs.
    pub path: String,
    /// The command that fetches or builds it.
    pub fetch: String,
}

/// The pipeline's serve target: the chat server on one stage's output.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeTarget {
    /// The stage whose output is served (`runs/<pipeline>/<stage>`).
    pub stage: String,
    /// Server config file (resolved like stage configs), passed as `--config`.
    pub config: Option<PathBuf>,
    /// Further nanochat-inference arguments.
    pub args: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    run: String,
    #[serde(default)]
    config: Option<ConfigSpec>,
    #[serde(default)]
    inputs: Option<InputsSpec>,
    #[serde(default)]
    resources: Option<Resources>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Data-parallel ranks started on this machine (`ranks: 8`).
    #[serde(default)]
    ranks: Option<u32>,
    /// How the ranks are started (`launcher: { kind: slurm, nodes: 4, ranks_per_node: 8 }`).
    #[serde(default)]
    launcher: Option<LauncherFile>,
    #[serde(default)]
    about: Option<String>,
    #[serde(default)]
    needs: Vec<Need>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LauncherFile {
    kind: String,
    #[serde(default)]
    nodes: Option<u32>,
    #[serde(default)]
    ranks_per_node: Option<u32>,
    /// Extra `srun` arguments (partition, account, GPUs, time limit...).
    #[serde(default)]
    srun_args: Vec<String>,
}

/// Most ranks one stage may ask for (a typo guard, not a limit of the collectives).
pub const MAX_RANKS: u32 = 65_536;

/// How a stage's processes are started. Part of the stage key through its world size.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Launch {
    /// One process (the default).
    #[default]
    Single,
    /// `ranks` processes on this machine, joined through a rendezvous on 127.0.0.1 (like
    /// `torchrun --standalone --nproc_per_node=ranks`).
    Local { ranks: u32 },
    /// `srun` with `nodes × ranks_per_node` tasks; the tasks find each other from Slurm's
    /// variables.
    Slurm {
        nodes: u32,
        ranks_per_node: u32,
        srun_args: Vec<String>,
    },
}

impl Launch {
    /// Total number of ranks.
    pub fn world_size(&self) -> u32 {
        match self {
            Launch::Single => 1,
            Launch::Local { ranks } => *ranks,
            Launch::Slurm {
                nodes,
                ranks_per_node,
                ..
            } => nodes * ranks_per_node,
        }
    }
}

/// The stage's launch from its `ranks` and `launcher` keys.
fn launch_of(ranks: Option<u32>, launcher: Option<LauncherFile>) -> Result<Launch, String> {
    let count = |what: &str, n: Option<u32>| -> Result<u32, String> {
        match n {
            None => Ok(1),
            Some(0) => Err(format!("{what} must be at least 1")),
            Some(n) if n > MAX_RANKS => Err(format!("{what} = {n} is more than {MAX_RANKS}")),
            Some(n) => Ok(n),
        }
    };
    let Some(l) = launcher else {
        let n = count("ranks", ranks)?;
        return Ok(if n == 1 {
            Launch::Single
        } else {
            Launch::Local { ranks: n }
        });
    };
    match l.kind.as_str() {
        "local" => {
            if l.nodes.is_some_and(|n| n != 1) {
                return Err(
                    "launcher kind local runs on this machine only: nodes must be 1 (use kind: slurm for several machines)"
                        .into(),
                );
            }
            if !l.srun_args.is_empty() {
                return Err("srun_args only apply to launcher kind slurm".into());
            }
            let n = match (ranks, l.ranks_per_node) {
                (Some(a), Some(b)) if a != b => {
                    return Err(format!(
                        "ranks = {a} and launcher.ranks_per_node = {b} disagree; give one of them"
                    ))
                }
                (a, b) => count("ranks", a.or(b))?,
            };
            Ok(if n == 1 {
                Launch::Single
            } else {
                Launch::Local { ranks: n }
            })
        }
        "slurm" => {
            if ranks.is_some() {
                return Err(
                    "with launcher kind slurm, give launcher.nodes and launcher.ranks_per_node instead of ranks"
                        .into(),
                );
            }
            let nodes = count("launcher.nodes", l.nodes)?;
            let per = count("launcher.ranks_per_node", l.ranks_per_node)?;
            if u64::from(nodes) * u64::from(per) > u64::from(MAX_RANKS) {
                return Err(format!(
                    "{nodes} nodes × {per} ranks per node is more than {MAX_RANKS} ranks"
                ));
            }
            Ok(Launch::Slurm {
                nodes,
                ranks_per_node: per,
                srun_args: l.srun_args,
            })
        }
        other => Err(format!(
            "launcher kind {other:?} is not one of: local, slurm"
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ConfigSpec {
    File(String),
    Inline(serde_yaml::Mapping),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum InputsSpec {
    /// `[tokenizer, base]`: input names equal the stage names.
    List(Vec<String>),
    /// `{ model: pretrain }`: input name -> producing stage.
    Map(BTreeMap<String, String>),
}

/// Scheduling hints; not part of the stage key.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Threads the stage may use; exported as `RAYON_NUM_THREADS` unless `env` sets it.
    #[serde(default)]
    pub threads: Option<u32>,
}

/// Where a stage's config comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// No config: an empty table.
    Empty,
    /// A TOML file (resolved path).
    File(PathBuf),
    /// An inline table from the YAML.
    Inline(toml::Table),
}

/// A validated stage.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub run: String,
    pub config: ConfigSource,
    /// Input name -> producing stage.
    pub inputs: BTreeMap<String, String>,
    pub resources: Resources,
    pub env: BTreeMap<String, String>,
    /// How its processes start (one, several local ranks, or `srun`).
    pub launch: Launch,
    /// What the stage does, in a sentence (documentation; not part of the key).
    pub about: Option<String>,
    /// Outside data it reads and how to fetch it (documentation; not part of the key).
    pub needs: Vec<Need>,
    /// Where the stage is declared (for later error messages).
    pub line: usize,
}

/// A validated pipeline: stages in a topological order (ties broken by file position).
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    /// Topologically sorted.
    pub stages: Vec<Stage>,
    /// What `nanochat-run serve --pipeline` serves.
    pub serve: Option<ServeTarget>,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Names of `name` and every stage that (transitively) consumes it.
    pub fn descendants(&self, name: &str) -> Vec<String> {
        let mut out = vec![name.to_string()];
        // Stages are topologically sorted, so one forward sweep suffices.
        for s in &self.stages {
            if s.inputs.values().any(|src| out.contains(src)) && !out.contains(&s.name) {
                out.push(s.name.clone());
            }
        }
        out
    }
}

/// Finds a pipeline by argument: an existing path wins; otherwise `pipelines/<arg>` and
/// `pipelines/<arg>.yaml` (relative to the current directory).
pub fn find_pipeline(arg: &str) -> anyhow::Result<PathBuf> {
    let direct = PathBuf::from(arg);
    if direct.is_file() {
        return Ok(direct);
    }
    let mut tried = vec![direct];
    for cand in [
        Path::new("pipelines").join(arg),
        Path::new("pipelines").join(format!("{arg}.yaml")),
    ] {
        if cand.is_file() {
            return Ok(cand);
        }
        tried.push(cand);
    }
    let available: Vec<String> = std::fs::read_dir("pipelines")
        .map(|rd| {
            let mut v: Vec<String> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    anyhow::bail!(
        "pipeline {arg:?} not found (tried {}){}",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        if available.is_empty() {
            String::new()
        } else {
            format!("; available in pipelines/: {}", available.join(", "))
        }
    )
}

/// 1-based line and column of the first line matching `pred`, pointing at `needle` in it.
fn locate(text: &str, needle: &str, pred: impl Fn(&str) -> bool) -> Option<(usize, usize)> {
    text.lines().enumerate().find_map(|(i, l)| {
        if pred(l) {
            let col = l.find(needle).map_or(1, |c| l[..c].chars().count() + 1);
            Some((i + 1, col))
        } else {
            None
        }
    })
}

/// The line declaring stage `name` (a mapping key `name:` indented under `stages:`).
fn stage_line(text: &str, name: &str) -> (usize, usize) {
    let key = format!("{name}:");
    let quoted = [format!("\"{name}\":"), format!("'{name}':")];
    locate(text, name, |l| {
        let t = l.trim_start();
        l.starts_with(' ') && (t.starts_with(&key) || quoted.iter().any(|q| t.starts_with(q)))
    })
    .unwrap_or((1, 1))
}

/// A line after `after` that mentions `word` as a whole token.
fn word_line_after(text: &str, after: usize, word: &str) -> Option<(usize, usize)> {
    text.lines().enumerate().skip(after).find_map(|(i, l)| {
        let code = l.split('#').next().unwrap_or("");
        let mut start = 0;
        while let Some(pos) = code[start..].find(word) {
            let at = start + pos;
            let before = code[..at].chars().last();
            let after_c = code[at + word.len()..].chars().next();
            let is_word = |c: Option<char>| {
                c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            };
            if !is_word(before) && !is_word(after_c) {
                return Some((i + 1, code[..at].chars().count() + 1));
            }
            start = at + word.len();
        }
        None
    })
}

/// Loads and validates a pipeline file.
pub fn load(path: &Path) -> Result<Pipeline, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        message: format!("cannot read pipeline: {e}"),
    })?;
    parse(&text, path)
}

/// Parses pipeline text; `path` labels errors and anchors relative config paths.
pub fn parse(text: &str, path: &Path) -> Result<Pipeline, PipelineError> {
    let err = |(line, column): (usize, usize), message: String| PipelineError {
        file: path.to_path_buf(),
        line,
        column,
        message,
    };
    let file: PipelineFile = serde_yaml::from_str(text).map_err(|e| {
        let loc = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        let mut msg = e.to_string();
        if let Some(cut) = msg.rfind(" at line ") {
            msg.truncate(cut);
        }
        if msg.contains("did not match any variant of untagged enum ConfigSpec") {
            msg = "config must be a TOML file path (string) or an inline table".into();
        } else if msg.contains("did not match any variant of untagged enum InputsSpec") {
            msg =
                "inputs must be a list of stage names or a map of input name to stage name".into();
        }
        err(loc, msg)
    })?;

    let name = match file.name {
        Some(n) => n,
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into()),
    };
    if !is_valid_name(&name) {
        let loc = locate(text, "name", |l| l.starts_with("name:")).unwrap_or((1, 1));
        return Err(err(
            loc,
            format!("pipeline name {name:?} must use only letters, digits, '_' or '-'"),
        ));
    }
    if file.stages.is_empty() {
        let loc = locate(text, "stages", |l| l.starts_with("stages:")).unwrap_or((1, 1));
        return Err(err(loc, "the pipeline has no stages".into()));
    }
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();

    let mut stages = Vec::new();
    for (sname, spec) in file.stages {
        let (line, col) = stage_line(text, &sname);
        if !is_valid_name(&sname) {
            return Err(err(
                (line, col),
                format!("stage name {sname:?} must use only letters, digits, '_' or '-'"),
            ));
        }
        if spec.run.trim().is_empty() {
            return Err(err(
                word_line_after(text, line, "run").unwrap_or((line, col)),
                format!("stage {sname}: `run` must name a stage binary"),
            ));
        }
        let config = match spec.config {
            None => ConfigSource::Empty,
            Some(ConfigSpec::File(p)) => {
                let resolved = resolve_config_path(&base, &p).ok_or_else(|| {
                    err(
                        word_line_after(text, line, "config").unwrap_or((line, col)),
                        format!(
                            "stage {sname}: config file {p:?} not found (looked relative to {} and its parent)",
                            base.display()
                        ),
                    )
                })?;
                ConfigSource::File(resolved)
            }
            Some(ConfigSpec::Inline(map)) => {
                let table = toml::Table::try_from(&map).map_err(|e| {
                    err(
                        word_line_after(text, line, "config").unwrap_or((line, col)),
                        format!("stage {sname}: inline config is not representable as TOML ({e}); nulls are not allowed"),
                    )
                })?;
                ConfigSource::Inline(table)
            }
        };
        let inputs = match spec.inputs {
            None => BTreeMap::new(),
            Some(InputsSpec::List(v)) => {
                let mut m = BTreeMap::new();
                for s in v {
                    if m.insert(s.clone(), s.clone()).is_some() {
                        return Err(err(
                            word_line_after(text, line, &s).unwrap_or((line, col)),
                            format!("stage {sname}: input {s:?} listed twice"),
                        ));
                    }
                }
                m
            }
            Some(InputsSpec::Map(m)) => m,
        };
        for input in inputs.keys() {
            if !is_valid_name(input) {
                return Err(err(
                    word_line_after(text, line, input).unwrap_or((line, col)),
                    format!("stage {sname}: input name {input:?} must use only letters, digits, '_' or '-'"),
                ));
            }
        }
        for key in spec.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(err(
                    word_line_after(text, line, "env").unwrap_or((line, col)),
                    format!("stage {sname}: invalid environment variable name {key:?}"),
                ));
            }
        }
        let key_of_launch = if spec.launcher.is_some() {
            "launcher"
        } else {
            "ranks"
        };
        let launch = launch_of(spec.ranks, spec.launcher).map_err(|m| {
            err(
                word_line_after(text, line, key_of_launch).unwrap_or((line, col)),
                format!("stage {sname}: {m}"),
            )
        })?;
        for reserved in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        ] {
            if launch != Launch::Single && spec.env.contains_key(reserved) {
                return Err(err(
                    word_line_after(text, line, reserved).unwrap_or((line, col)),
                    format!(
                        "stage {sname}: env sets {reserved}, which the launcher sets for each rank"
                    ),
                ));
            }
        }
        stages.push(Stage {
            name: sname,
            run: spec.run,
            config,
            inputs,
            resources: spec.resources.unwrap_or_default(),
            env: spec.env,
            launch,
            about: spec.about,
            needs: spec.needs,
            line,
        });
    }

    // Every input must name a stage.
    let names: Vec<String> = stages.iter().map(|s| s.name.clone()).collect();
    let serve = match file.serve {
        None => None,
        Some(sv) => {
            let loc = || locate(text, "serve", |l| l.starts_with("serve:")).unwrap_or((1, 1));
            if !names.contains(&sv.stage) {
                return Err(err(
                    loc(),
                    format!(
                        "serve: stage {:?} is not a stage of this pipeline (stages: {})",
                        sv.stage,
                        names.join(", ")
                    ),
                ));
            }
            let config = match sv.config {
                None => None,
                Some(p) => Some(resolve_config_path(&base, &p).ok_or_else(|| {
                    err(
                        loc(),
                        format!(
                            "serve: config file {p:?} not found (looked relative to {} and its parent)",
                            base.display()
                        ),
                    )
                })?),
            };
            Some(ServeTarget {
                stage: sv.stage,
                config,
                args: sv.args,
            })
        }
    };
    for s in &stages {
        for (input, src) in &s.inputs {
            if !names.contains(src) {
                let loc = word_line_after(text, s.line, src).unwrap_or((s.line, 1));
                let known = names.join(", ");
                return Err(err(
                    loc,
                    format!(
                        "stage {}: input {input:?} refers to unknown stage {src:?} (stages: {known})",
                        s.name
                    ),
                ));
            }
            if src == &s.name {
                let loc = word_line_after(text, s.line, src).unwrap_or((s.line, 1));
                return Err(err(
                    loc,
                    format!("stage {} lists itself as an input", s.name),
                ));
            }
        }
    }

    // Build the DAG (edge: producer -> consumer), then order it.
    let mut graph: DiGraph<usize, ()> = DiGraph::new();
    let idx: Vec<NodeIndex> = (0..stages.len()).map(|i| graph.add_node(i)).collect();
    for (i, s) in stages.iter().enumerate() {
        for src in s.inputs.values() {
            if let Some(j) = stages.iter().position(|t| &t.name == src) {
                graph.add_edge(idx[j], idx[i], ());
            }
        }
    }
    if petgraph::algo::is_cyclic_directed(&graph) {
        let cycle = petgraph::algo::tarjan_scc(&graph)
            .into_iter()
            .find(|c| c.len() > 1)
            .unwrap_or_default();
        let mut members: Vec<&Stage> = cycle.iter().map(|n| &stages[graph[*n]]).collect();
        members.sort_by_key(|s| s.line);
        let first = members.first().map_or(1, |s| s.line);
        let names: Vec<&str> = members.iter().map(|s| s.name.as_str()).collect();
        return Err(err(
            (first, 1),
            format!("stages form a cycle: {}", names.join(" -> ")),
        ));
    }
    // Kahn's algorithm with a min-heap on file line, so order is deterministic and readable.
    let mut indegree: Vec<usize> = stages.iter().map(|s| s.inputs.len()).collect();
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<(usize, usize)>> = stages
        .iter()
        .enumerate()
        .filter(|(i, _)| indegree[*i] == 0)
        .map(|(i, s)| std::cmp::Reverse((s.line, i)))
        .collect();
    let mut order = Vec::new();
    while let Some(std::cmp::Reverse((_, i))) = ready.pop() {
        order.push(i);
        for (j, t) in stages.iter().enumerate() {
            let uses = t
                .inputs
                .values()
                .filter(|src| **src == stages[i].name)
                .count();
            if uses > 0 {
                indegree[j] -= uses;
                if indegree[j] == 0 {
                    ready.push(std::cmp::Reverse((t.line, j)));
                }
            }
        }
    }
    let sorted: Vec<Stage> = order.into_iter().map(|i| stages[i].clone()).collect();
    Ok(Pipeline {
        name,
        file: path.to_path_buf(),
        stages: sorted,
        serve,
    })
}

fn resolve_config_path(base: &Path, p: &str) -> Option<PathBuf> {
    let candidate = Path::new(p);
    if candidate.is_absolute() {
        return candidate.is_file().then(|| candidate.to_path_buf());
    }
    let mut dirs = vec![base.to_path_buf()];
    if let Some(parent) = base.parent() {
        dirs.push(if parent.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            parent.to_path_buf()
        });
    }
    dirs.into_iter()
        .map(|d| d.join(candidate))
        .find(|c| c.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Pipeline, PipelineError> {
        parse(text, Path::new("/nonexistent/pipelines/p.yaml"))
    }

    #[test]
    fn about_needs_and_serve_are_read_and_the_serve_stage_must_exist() {
        let p = parse_str(
            "stages:\n  a:\n    run: x\n    about: makes a\n    needs:\n      - path: data/a\n        fetch: get-a.sh\nserve:\n  stage: a\n  args: [--port, \"9\"]\n",
        )
        .unwrap();
        let a = p.stage("a").unwrap();
        assert_eq!(a.about.as_deref(), Some("makes a"));
        assert_eq!(
            a.needs,
            vec![Need {
                path: "data/a".into(),
                fetch: "get-a.sh".into()
            }]
        );
        assert_eq!(
            p.serve,
            Some(ServeTarget {
                stage: "a".into(),
                config: None,
                args: vec!["--port".into(), "9".into()],
            })
        );
        let e = parse_str("stages:\n  a:\n    run: x\nserve:\n  stage: b\n").unwrap_err();
        assert_eq!((e.line, e.column), (4, 1), "{e}");
        assert!(e.message.contains("stage \"b\" is not a stage"), "{e}");
        let e = parse_str("stages:\n  a:\n    run: x\n    needs: [{ path: p }]\n").unwrap_err();
        assert!(e.message.contains("fetch"), "{e}");
    }

    #[test]
    fn parses_and_orders_stages() {
        let p = parse_str(
            "name: demo\nstages:\n  c:\n    run: bin-c\n    inputs: [a, b]\n  b:\n    run: bin-b\n    inputs: { src: a }\n    config: { steps: 3, opt: { lr: 0.5 } }\n    env: { X: \"1\" }\n    resources: { threads: 2 }\n  a:\n    run: bin-a\n",
        )
        .unwrap();
        assert_eq!(p.name, "demo");
        let order: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["a", "b", "c"]);
        let b = p.stage("b").unwrap();
        assert_eq!(b.inputs.get("src").map(String::as_str), Some("a"));
        assert_eq!(b.resources.threads, Some(2));
        let ConfigSource::Inline(t) = &b.config else {
            panic!()
        };
        assert_eq!(t["steps"].as_integer(), Some(3));
        assert_eq!(p.descendants("b"), ["b", "c"]);
        assert_eq!(p.descendants("a"), ["a", "b", "c"]);
    }

    #[test]
    fn ranks_and_launchers() {
        let launch = |extra: &str| {
            parse_str(&format!("stages:\n  a:\n    run: x\n{extra}"))
                .map(|p| p.stages[0].launch.clone())
        };
        assert_eq!(launch("").unwrap(), Launch::Single);
        assert_eq!(launch("    ranks: 1\n").unwrap(), Launch::Single);
        assert_eq!(
            launch("    ranks: 4\n").unwrap(),
            Launch::Local { ranks: 4 }
        );
        assert_eq!(
            launch("    launcher: { kind: local, ranks_per_node: 2 }\n").unwrap(),
            Launch::Local { ranks: 2 }
        );
        let slurm = launch(
            "    launcher: { kind: slurm, nodes: 4, ranks_per_node: 8, srun_args: [--partition=gpu] }\n",
        )
        .unwrap();
        assert_eq!(
            slurm,
            Launch::Slurm {
                nodes: 4,
                ranks_per_node: 8,
                srun_args: vec!["--partition=gpu".into()]
            }
        );
        assert_eq!(slurm.world_size(), 32);
        for (extra, msg, line) in [
            ("    ranks: 0\n", "ranks must be at least 1", 4),
            ("    ranks: 100000\n", "more than 65536", 4),
            (
                "    launcher: { kind: mpi }\n",
                "not one of: local, slurm",
                4,
            ),
            (
                "    launcher: { kind: local, nodes: 2 }\n",
                "nodes must be 1",
                4,
            ),
            (
                "    ranks: 2\n    launcher: { kind: local, ranks_per_node: 3 }\n",
                "disagree",
                5,
            ),
            (
                "    ranks: 2\n    launcher: { kind: slurm, nodes: 2 }\n",
                "instead of ranks",
                5,
            ),
            (
                "    launcher: { kind: slurm, nodes: 0 }\n",
                "launcher.nodes must be at least 1",
                4,
            ),
            (
                "    launcher: { kind: slurm, nodes: 300, ranks_per_node: 300 }\n",
                "more than 65536 ranks",
                4,
            ),
            (
                "    ranks: 2\n    env: { RANK: \"3\" }\n",
                "env sets RANK",
                5,
            ),
        ] {
            let e = launch(extra).unwrap_err();
            assert!(e.message.contains(msg), "{extra}: {e}");
            assert_eq!(e.line, line, "{extra}: {e}");
        }
        let e = launch("    launcher: { kind: slurm, gpus: 8 }\n").unwrap_err();
        assert!(e.message.contains("unknown field `gpus`"), "{e}");
    }

    #[test]
    fn name_defaults_to_file_stem() {
        let p = parse_str("stages:\n  a:\n    run: x\n").unwrap();
        assert_eq!(p.name, "p");
    }

    #[test]
    fn unknown_keys_cite_line_and_column() {
        let e = parse_str("stages:\n  a:\n    run: x\n    bogus: 1\n").unwrap_err();
        assert_eq!((e.line, e.column), (4, 5), "{e}");
        assert!(e.message.contains("unknown field `bogus`"), "{e}");
        assert!(
            e.to_string()
                .starts_with("/nonexistent/pipelines/p.yaml:4:5: "),
            "{e}"
        );
        let e = parse_str("stages:\n  a:\n    run: x\nextra: 1\n").unwrap_err();
        assert_eq!(e.line, 4, "{e}");
    }

    #[test]
    fn malformed_yaml_cites_location() {
        let e = parse_str("stages:\n  a:\n    run: [x\n").unwrap_err();
        assert!(e.line >= 3, "{e}");
        let e = parse_str("stages:\n  a:\n    inputs: [b]\n").unwrap_err();
        assert!(e.message.contains("missing field `run`"), "{e}");
    }

    #[test]
    fn unknown_input_stage_points_at_the_reference() {
        let e = parse_str("stages:\n  a:\n    run: x\n  b:\n    run: y\n    inputs: { m: nope }\n")
            .unwrap_err();
        assert_eq!((e.line, e.column), (6, 18), "{e}");
        assert!(e.message.contains("unknown stage \"nope\""), "{e}");
    }

    #[test]
    fn cycles_are_reported_with_members() {
        let e = parse_str(
            "stages:\n  a:\n    run: x\n    inputs: [c]\n  b:\n    run: y\n    inputs: [a]\n  c:\n    run: z\n    inputs: [b]\n",
        )
        .unwrap_err();
        assert!(e.message.contains("cycle: a -> b -> c"), "{e}");
        assert_eq!(e.line, 2);
        let e = parse_str("stages:\n  a:\n    run: x\n    inputs: [a]\n").unwrap_err();
        assert!(e.message.contains("itself"), "{e}");
    }

    #[test]
    fn missing_config_file_and_bad_shapes() {
        let e =
            parse_str("stages:\n  a:\n    run: x\n    config: configs/none.toml\n").unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("configs/none.toml"), "{e}");
        let e = parse_str("stages:\n  a:\n    run: x\n    config: [1]\n").unwrap_err();
        assert!(e.message.contains("TOML file path"), "{e}");
        let e = parse_str("stages:\n  a:\n    run: x\n    config: { a: null }\n").unwrap_err();
        assert!(e.message.contains("nulls"), "{e}");
        let e = parse_str("stages: {}\n").unwrap_err();
        assert!(e.message.contains("no stages"), "{e}");
        let e = parse_str("stages:\n  a b:\n    run: x\n").unwrap_err();
        assert!(e.message.contains("stage name"), "{e}");
        let e = parse_str("name: a/b\nstages:\n  a:\n    run: x\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = parse_str("stages:\n  a:\n    run: \"\"\n").unwrap_err();
        assert!(e.message.contains("run"), "{e}");
        let e = parse_str("stages:\n  a:\n    run: x\n  b:\n    run: y\n    inputs: [a, a]\n")
            .unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
    }

    #[test]
    fn config_files_resolve_next_to_pipeline_or_its_parent() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("pipelines")).unwrap();
        std::fs::create_dir_all(d.path().join("configs")).unwrap();
        std::fs::write(d.path().join("configs/a.toml"), "x = 1\n").unwrap();
        let p = parse(
            "stages:\n  a:\n    run: x\n    config: configs/a.toml\n",
            &d.path().join("pipelines/p.yaml"),
        )
        .unwrap();
        let ConfigSource::File(f) = &p.stages[0].config else {
            panic!()
        };
        assert_eq!(f, &d.path().join("configs/a.toml"));
    }
}
