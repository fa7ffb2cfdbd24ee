//! Resident memory of a process, from `/proc/PID/status`.

/// `VmRSS` of `pid` in kB, when readable.
pub fn vm_rss_kb(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// `VmHWM` (peak resident set) of `pid` in kB, when readable.
pub fn vm_hwm_kb(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM:")
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
}
