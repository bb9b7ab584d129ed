//! Slurm's compressed host lists (`SLURM_JOB_NODELIST`): `gpu[01-04,07],login1` names
//! gpu01, gpu02, gpu03, gpu04, gpu07 and login1. A name may hold several bracket groups
//! (`r[1-2]n[1-2]`: r1n1, r1n2, r2n1, r2n2, in that order); a range keeps the zero padding of its
//! lower bound (`[08-10]`: 08, 09, 10), as `scontrol show hostnames` prints them.

use crate::DistError;

/// A list longer than this is refused rather than expanded (a typo such as `n[1-999999999]`).
const MAX_HOSTS: usize = 1 << 20;

fn bad(list: &str, why: impl std::fmt::Display) -> DistError {
    DistError::Env(format!("SLURM_JOB_NODELIST={list:?}: {why}"))
}

/// Splits at commas outside brackets.
fn top_level_items(list: &str) -> Result<Vec<&str>, DistError> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth > 0 => return Err(bad(list, "nested '['")),
            '[' => depth = 1,
            ']' if depth == 0 => return Err(bad(list, "']' without '['")),
            ']' => depth = 0,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err(bad(list, "unclosed '['"));
    }
    items.push(&list[start..]);
    if items.iter().any(|s| s.trim().is_empty()) {
        return Err(bad(list, "empty host name"));
    }
    Ok(items.into_iter().map(str::trim).collect())
}

/// The values of one bracket group (`01-04,07` → 01 02 03 04 07).
fn group_values(list: &str, group: &str) -> Result<Vec<String>, DistError> {
    let mut out = Vec::new();
    for part in group.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(bad(list, format!("[{group}]: {part:?} is not N or N-M")));
        }
        let parse = |s: &str| {
            s.parse::<u64>()
                .map_err(|e| bad(list, format!("[{group}]: {s}: {e}")))
        };
        let (a, b) = (parse(lo)?, parse(hi)?);
        if a > b {
            return Err(bad(list, format!("[{group}]: range {part} runs backwards")));
        }
        if out.len() as u64 + (b - a) >= MAX_HOSTS as u64 {
            return Err(bad(list, format!("more than {MAX_HOSTS} hosts")));
        }
        let width = lo.len();
        out.extend((a..=b).map(|v| format!("{v:0width$}")));
    }
    Ok(out)
}

/// The hosts of one item (`pre[..]mid[..]post`), in Slurm's order (last group fastest).
fn expand_item(list: &str, item: &str) -> Result<Vec<String>, DistError> {
    let mut names = vec![String::new()];
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        let close = rest[open..]
            .find(']')
            .map(|c| open + c)
            .ok_or_else(|| bad(list, "unclosed '['"))?;
        let prefix = &rest[..open];
        let values = group_values(list, &rest[open + 1..close])?;
        if names.len().saturating_mul(values.len()) > MAX_HOSTS {
            return Err(bad(list, format!("more than {MAX_HOSTS} hosts")));
        }
        names = names
            .iter()
            .flat_map(|n| values.iter().map(move |v| format!("{n}{prefix}{v}")))
            .collect();
        rest = &rest[close + 1..];
    }
    for n in &mut names {
        n.push_str(rest);
    }
    Ok(names)
}

/// Every host of a compressed list, in order.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, DistError> {
    let mut hosts = Vec::new();
    for item in top_level_items(list.trim())? {
        hosts.extend(expand_item(list, item)?);
        if hosts.len() > MAX_HOSTS {
            return Err(bad(list, format!("more than {MAX_HOSTS} hosts")));
        }
    }
    Ok(hosts)
}

/// The first host of a compressed list (where Slurm puts rank 0 with the default block
/// distribution).
pub fn first_host(list: &str) -> Result<String, DistError> {
    let items = top_level_items(list.trim())?;
    expand_item(list, items[0])?
        .into_iter()
        .next()
        .ok_or_else(|| bad(list, "no hosts"))
}

/// Slurm's per-node task counts (`SLURM_TASKS_PER_NODE`, e.g. `2(x3),1`: 2, 2, 2, 1).
pub fn expand_tasks_per_node(spec: &str) -> Result<Vec<usize>, DistError> {
    let err = |why: String| DistError::Env(format!("tasks per node {spec:?}: {why}"));
    let mut out = Vec::new();
    for part in spec.trim().split(',') {
        let part = part.trim();
        let (count, repeat) = match part.split_once('(') {
            None => (part, "1"),
            Some((c, r)) => {
                let r = r
                    .strip_prefix('x')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| err(format!("{part:?} is not N or N(xM)")))?;
                (c, r)
            }
        };
        let count: usize = count
            .parse()
            .map_err(|_| err(format!("{part:?} is not N or N(xM)")))?;
        let repeat: usize = repeat
            .parse()
            .map_err(|_| err(format!("{part:?} is not N or N(xM)")))?;
        if out.len() + repeat > MAX_HOSTS {
            return Err(err(format!("more than {MAX_HOSTS} nodes")));
        }
        out.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_lists_padding_and_suffixes() {
        assert_eq!(
            expand_hostlist("gpu[01-04,07]").unwrap(),
            ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]
        );
        assert_eq!(
            expand_hostlist("a[8-10],login1, b7").unwrap(),
            ["a8", "a9", "a10", "login1", "b7"]
        );
        assert_eq!(
            expand_hostlist("n[08-10]-ib").unwrap(),
            ["n08-ib", "n09-ib", "n10-ib"]
        );
        assert_eq!(
            expand_hostlist("r[1-2]n[1-2]").unwrap(),
            ["r1n1", "r1n2", "r2n1", "r2n2"]
        );
        assert_eq!(expand_hostlist("localhost").unwrap(), ["localhost"]);
        assert_eq!(first_host("gpu[01-04,07],x").unwrap(), "gpu01");
        assert_eq!(first_host("c[3,1]").unwrap(), "c3");
    }

    #[test]
    fn malformed_lists_say_what_is_wrong() {
        for (list, why) in [
            ("gpu[01-04", "unclosed"),
            ("gpu01]", "without"),
            ("gpu[4-1]", "backwards"),
            ("gpu[a-b]", "not N or N-M"),
            ("gpu[1-2[3]]", "nested"),
            ("a,,b", "empty host"),
            ("n[1-99999999]", "more than"),
        ] {
            let e = expand_hostlist(list).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(list), "{list}: {e}");
        }
    }

    #[test]
    fn tasks_per_node() {
        assert_eq!(expand_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
        assert_eq!(expand_tasks_per_node("8").unwrap(), [8]);
        assert!(expand_tasks_per_node("2(3)").is_err());
        assert!(expand_tasks_per_node("x").is_err());
    }

    proptest::proptest! {
        /// Compressing a set of numbered hosts into one bracket group and expanding it gives
        /// the hosts back, in order, with their padding.
        #[test]
        fn bracket_groups_round_trip(mut nums in proptest::collection::btree_set(0u32..500, 1..20), width in 1usize..4) {
            let nums: Vec<u32> = std::mem::take(&mut nums).into_iter().collect();
            let names: Vec<String> = nums.iter().map(|n| format!("node{n:0width$}")).collect();
            // Runs of consecutive numbers as N-M, the way Slurm compresses.
            let mut parts = Vec::new();
            let mut i = 0;
            while i < nums.len() {
                let mut j = i;
                while j + 1 < nums.len() && nums[j + 1] == nums[j] + 1 { j += 1; }
                parts.push(if i == j {
                    format!("{:0width$}", nums[i])
                } else {
                    format!("{:0width$}-{:0width$}", nums[i], nums[j])
                });
                i = j + 1;
            }
            let list = format!("node[{}]", parts.join(","));
            proptest::prop_assert_eq!(expand_hostlist(&list).unwrap(), names);
        }
    }
}
