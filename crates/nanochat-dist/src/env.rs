//! Who this process is in a data-parallel job, from the environment the launcher gives it.
//!
//! - torchrun (and `nanochat-run`'s local launcher, and anyone by hand): `RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`.
//! - Slurm (`srun`): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, the per-node task counts
//!   (`SLURM_STEP_TASKS_PER_NODE`/`SLURM_TASKS_PER_NODE` with `SLURM_NODEID`), and rank 0's
//!   host: the first host of `SLURM_JOB_NODELIST` (Slurm's block distribution puts task 0 there)
//!   unless `MASTER_ADDR` is set. The port is `MASTER_PORT`, else `29500 + SLURM_JOB_ID % 10000`
//!   (two jobs sharing a node do not collide), else 29500.
//! - Neither: a world of one.
//!
//! When both are present (torchrun started inside an `srun` step) the torchrun variables win:
//! they describe the innermost launcher. Values that cannot all be true (a rank outside the
//! world, `WORLD_SIZE` without `RANK`, a world of several ranks with no `MASTER_ADDR`) are
//! errors naming the variables.

use crate::hostlist::{expand_tasks_per_node, first_host};
use crate::DistError;

/// The rendezvous port when nothing else says (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which launcher described this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: a world of one.
    Single,
    /// torchrun-style `RANK`/`WORLD_SIZE` variables.
    Torchrun,
    /// Slurm `SLURM_*` variables.
    Slurm,
}

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0 ≤ rank < world_size`.
    pub rank: usize,
    /// Number of ranks in the job.
    pub world_size: usize,
    /// Rank among the processes of this machine (which GPU a CUDA rank uses).
    pub local_rank: usize,
    /// Processes of this job on this machine.
    pub local_world_size: usize,
    /// Host name or address of rank 0's rendezvous.
    pub master_addr: String,
    /// Port of rank 0's rendezvous.
    pub master_port: u16,
    /// Where these values came from.
    pub launcher: Launcher,
    /// Identifies the job, so that a rank of another job reaching the same port is turned
    /// away: `NANOCHAT_DIST_JOB`, else the Slurm job and step ids, else `TORCHELASTIC_RUN_ID`.
    pub job_tag: String,
}

impl DistEnv {
    /// A world of one (no launcher).
    pub fn single() -> DistEnv {
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
            launcher: Launcher::Single,
            job_tag: String::new(),
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<DistEnv, DistError> {
        DistEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `var` (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<DistEnv, DistError> {
        let get = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let env = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            torchrun(&get)?
        } else if get("SLURM_PROCID").is_some() {
            slurm(&get)?
        } else {
            return Ok(DistEnv::single());
        };
        env.validate()?;
        Ok(env)
    }

    /// True for a world of more than one rank.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// The torchrun-style variables that describe this rank (what a launcher exports for it).
    pub fn to_vars(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world_size.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ];
        if !self.job_tag.is_empty() {
            v.push(("NANOCHAT_DIST_JOB", self.job_tag.clone()));
        }
        v
    }

    fn validate(&self) -> Result<(), DistError> {
        let (r, l) = match self.launcher {
            Launcher::Slurm => (
                ("SLURM_PROCID", "SLURM_NTASKS"),
                ("SLURM_LOCALID", "the tasks of this node"),
            ),
            _ => (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")),
        };
        if self.world_size == 0 {
            return Err(DistError::Env(format!(
                "{} = 0: a job has at least one rank",
                r.1
            )));
        }
        if self.rank >= self.world_size {
            return Err(DistError::Env(format!(
                "{} = {} is outside the world: {} = {} allows ranks 0..{}",
                r.0,
                self.rank,
                r.1,
                self.world_size,
                self.world_size - 1
            )));
        }
        if self.local_world_size == 0 || self.local_world_size > self.world_size {
            return Err(DistError::Env(format!(
                "{} = {} but {} = {}: need 1 ≤ {} ≤ {}",
                l.1, self.local_world_size, r.1, self.world_size, l.1, r.1
            )));
        }
        if self.local_rank >= self.local_world_size {
            return Err(DistError::Env(format!(
                "{} = {} but {} = {}: need {} < {}",
                l.0, self.local_rank, l.1, self.local_world_size, l.0, l.1
            )));
        }
        Ok(())
    }
}

fn parse_num<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, DistError> {
    value
        .parse::<T>()
        .map_err(|_| DistError::Env(format!("{name} = {value:?} is not a non-negative integer")))
}

fn required<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
    because: &str,
) -> Result<T, DistError> {
    let v = get(name).ok_or_else(|| DistError::Env(format!("{name} is not set ({because})")))?;
    parse_num(name, &v)
}

fn optional<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<T>, DistError> {
    get(name).map(|v| parse_num(name, &v)).transpose()
}

fn port(get: &dyn Fn(&str) -> Option<String>, fallback: u16) -> Result<u16, DistError> {
    match get("MASTER_PORT") {
        None => Ok(fallback),
        Some(v) => match v.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(DistError::Env(format!(
                "MASTER_PORT = {v:?} is not a port number (1-65535)"
            ))),
        },
    }
}

fn job_tag(get: &dyn Fn(&str) -> Option<String>) -> String {
    if let Some(t) = get("NANOCHAT_DIST_JOB") {
        return t;
    }
    if let Some(job) = get("SLURM_JOB_ID") {
        return format!("slurm:{job}.{}", get("SLURM_STEP_ID").unwrap_or_default());
    }
    get("TORCHELASTIC_RUN_ID").unwrap_or_default()
}

fn torchrun(get: &dyn Fn(&str) -> Option<String>) -> Result<DistEnv, DistError> {
    let rank: usize = required(get, "RANK", "WORLD_SIZE is set: every rank needs its RANK")?;
    let world_size: usize = required(
        get,
        "WORLD_SIZE",
        "RANK is set: every rank needs the number of ranks",
    )?;
    // By hand on one machine the local values are the global ones.
    let local_rank = optional(get, "LOCAL_RANK")?.unwrap_or(rank);
    let local_world_size = optional(get, "LOCAL_WORLD_SIZE")?.unwrap_or(world_size);
    let master_addr = match get("MASTER_ADDR") {
        Some(a) => a,
        None if world_size == 1 => "127.0.0.1".into(),
        None => {
            return Err(DistError::Env(format!(
                "MASTER_ADDR is not set but WORLD_SIZE = {world_size}: set it to rank 0's host \
                 name or address (127.0.0.1 when every rank runs on this machine)"
            )))
        }
    };
    Ok(DistEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port: port(get, DEFAULT_MASTER_PORT)?,
        launcher: Launcher::Torchrun,
        job_tag: job_tag(get),
    })
}

fn slurm(get: &dyn Fn(&str) -> Option<String>) -> Result<DistEnv, DistError> {
    let rank: usize = required(get, "SLURM_PROCID", "")?;
    let world_size: usize = required(
        get,
        "SLURM_NTASKS",
        "SLURM_PROCID is set; start the stage with `srun --ntasks=N`",
    )?;
    let local_rank = optional(get, "SLURM_LOCALID")?.unwrap_or(0);
    let local_world_size = slurm_local_world(get, world_size)?;
    let master_addr =
        match (
            get("MASTER_ADDR"),
            get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST")),
        ) {
            (Some(a), _) => a,
            (None, Some(list)) => first_host(&list)?,
            (None, None) if world_size == 1 => "127.0.0.1".into(),
            (None, None) => return Err(DistError::Env(
                "neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: cannot tell where rank 0 runs"
                    .into(),
            )),
        };
    let fallback = match optional::<u64>(get, "SLURM_JOB_ID")? {
        Some(job) => DEFAULT_MASTER_PORT + (job % 10_000) as u16,
        None => DEFAULT_MASTER_PORT,
    };
    Ok(DistEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port: port(get, fallback)?,
        launcher: Launcher::Slurm,
        job_tag: job_tag(get),
    })
}

/// Tasks of this job step on this node.
fn slurm_local_world(
    get: &dyn Fn(&str) -> Option<String>,
    world_size: usize,
) -> Result<usize, DistError> {
    let per_node = get("SLURM_STEP_TASKS_PER_NODE").or_else(|| get("SLURM_TASKS_PER_NODE"));
    if let Some(spec) = per_node {
        let counts = expand_tasks_per_node(&spec)?;
        let node: usize = optional(get, "SLURM_NODEID")?.unwrap_or(0);
        return counts.get(node).copied().ok_or_else(|| {
            DistError::Env(format!(
                "SLURM_NODEID = {node} but the tasks per node {spec:?} list {} nodes",
                counts.len()
            ))
        });
    }
    if let Some(n) = optional(get, "SLURM_NTASKS_PER_NODE")? {
        return Ok(n);
    }
    Ok(match optional::<usize>(get, "SLURM_NNODES")? {
        Some(nodes) if nodes > 0 && world_size.is_multiple_of(nodes) => world_size / nodes,
        _ => world_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv, DistError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn nothing_set_is_a_world_of_one() {
        let e = env(&[]).unwrap();
        assert_eq!(e, DistEnv::single());
        assert!(!e.is_distributed());
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_RUN_ID", "r1"),
        ])
        .unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.local_world_size),
            (5, 16, 1, 4)
        );
        assert_eq!((e.master_addr.as_str(), e.master_port), ("node7", 1234));
        assert_eq!((e.launcher, e.job_tag.as_str()), (Launcher::Torchrun, "r1"));
        // The launcher's variables read back as the same environment.
        let vars: HashMap<&str, String> = e.to_vars().into_iter().collect();
        let back = DistEnv::from_vars(|k| vars.get(k).cloned()).unwrap();
        assert_eq!(back.rank, 5);
        assert_eq!(back.master_port, 1234);
        // By hand: local values default to the global ones, the port to 29500.
        let e = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
        ])
        .unwrap();
        assert_eq!(
            (e.local_rank, e.local_world_size, e.master_port),
            (1, 2, 29500)
        );
    }

    #[test]
    fn slurm_variables() {
        let e = env(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "12"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "3"),
            ("SLURM_STEP_TASKS_PER_NODE", "3(x3),2"),
            ("SLURM_JOB_NODELIST", "gpu[01-04,07]"),
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_STEP_ID", "0"),
        ])
        .unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.local_world_size),
            (9, 12, 1, 2)
        );
        assert_eq!(e.master_addr, "gpu01");
        assert_eq!(e.master_port, 29500 + 3456);
        assert_eq!(e.launcher, Launcher::Slurm);
        assert_eq!(e.job_tag, "slurm:123456.0");
        // MASTER_ADDR / MASTER_PORT override; torchrun inside srun wins over SLURM_*.
        let e = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "a[1-2]"),
            ("MASTER_ADDR", "10.0.0.9"),
            ("MASTER_PORT", "4000"),
        ])
        .unwrap();
        assert_eq!((e.master_addr.as_str(), e.master_port), ("10.0.0.9", 4000));
        assert_eq!(e.local_world_size, 2);
        let e = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "h"),
        ])
        .unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.launcher),
            (3, 4, Launcher::Torchrun)
        );
    }

    #[test]
    fn inconsistent_values_name_the_variables() {
        for (pairs, expect) in [
            (
                vec![("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
                "RANK = 2 is outside",
            ),
            (vec![("WORLD_SIZE", "2")], "RANK is not set"),
            (vec![("RANK", "0")], "WORLD_SIZE is not set"),
            (vec![("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE = 0"),
            (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK = \"x\""),
            (
                vec![("RANK", "1"), ("WORLD_SIZE", "2")],
                "MASTER_ADDR is not set",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "70000"),
                ],
                "MASTER_PORT",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "4"),
                    ("LOCAL_RANK", "2"),
                    ("LOCAL_WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                ],
                "LOCAL_RANK = 2",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_WORLD_SIZE", "3"),
                    ("MASTER_ADDR", "h"),
                ],
                "LOCAL_WORLD_SIZE = 3",
            ),
            (vec![("SLURM_PROCID", "0")], "SLURM_NTASKS is not set"),
            (
                vec![
                    ("SLURM_PROCID", "4"),
                    ("SLURM_NTASKS", "4"),
                    ("SLURM_JOB_NODELIST", "a"),
                ],
                "SLURM_PROCID = 4",
            ),
            (
                vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")],
                "SLURM_JOB_NODELIST",
            ),
            (
                vec![
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_JOB_NODELIST", "a[1-"),
                ],
                "unclosed",
            ),
            (
                vec![
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_JOB_NODELIST", "a"),
                    ("SLURM_NODEID", "5"),
                    ("SLURM_TASKS_PER_NODE", "2"),
                ],
                "SLURM_NODEID = 5",
            ),
        ] {
            let e = env(&pairs).unwrap_err().to_string();
            assert!(e.contains(expect), "{pairs:?}: {e}");
        }
    }
}
