//! What both benches report besides time.

/// The process's peak resident memory (VmHWM), in MiB, where /proc has it.
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// [`peak_memory_mib`] as text: "1234 MiB", or "n/a".
pub fn peak_text() -> String {
    peak_memory_mib()
        .map(|m| format!("{m:.0} MiB"))
        .unwrap_or_else(|| "n/a".into())
}
