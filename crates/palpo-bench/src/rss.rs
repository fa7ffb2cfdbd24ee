//! Resident memory of a process, from `/proc/PID/status`, and its CPU time, from
//! `/proc/PID/stat`.

/// `VmRSS` of `pid` in kB, when readable.
pub fn vm_rss_kb(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// `VmHWM` (peak resident set) of `pid` in kB, when readable.
pub fn vm_hwm_kb(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM:")
}

/// CPU time (user and system) `pid` has used so far, in microseconds, when readable. Read at
/// the start and end of a phase, it gives the CPU per event: a figure much steadier than a
/// rate on a machine whose cores the server shares with the load generator.
pub fn cpu_time_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks * (1_000_000 / USER_HZ))
}

/// The kernel's unit for CPU times in `/proc` (`USER_HZ`): 100 on every Linux architecture
/// this runs on.
const USER_HZ: u64 = 100;

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces, so fields are counted after its closing one.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_field(&status, field)
}

fn parse_field(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_status_lines() {
        let s = "Name:\tpalpo\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(super::parse_field(s, "VmRSS:"), Some(10240));
        assert_eq!(super::parse_field(s, "VmHWM:"), Some(20480));
        assert_eq!(super::parse_field(s, "VmSwap:"), None);
    }

    #[test]
    fn parses_cpu_ticks_after_a_name_with_spaces() {
        let stat = "4242 (tokio rt) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 37 0 0 20 0 \
                    19 0 123 1000000 2000 18446744073709551615";
        assert_eq!(super::parse_cpu_ticks(stat), Some(287));
        assert_eq!(super::parse_cpu_ticks("garbage"), None);
    }
}
