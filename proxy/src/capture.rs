//! `trellis-proxy init`: the traffic capture rules a pod (or any network namespace) needs for its
//! sidecar, as App Mesh's proxy-route manager installed them — inbound TCP to the app's ports
//! redirected to the proxy's ingress, outbound TCP redirected to its egress, except the proxy's
//! own traffic (by its UID), loopback, and the ports and addresses left out. Installed with
//! `iptables-restore` into chains of their own (`TRELLIS_INBOUND`, `TRELLIS_OUTPUT`), so running
//! it again replaces them (idempotent); `--dry-run` prints the rules instead.

use std::{
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

/// `trellis-proxy init` flags (App Mesh's injector names in parentheses).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "trellis-proxy init",
    about = "Install the traffic capture rules for a sidecar (iptables, nat table)"
)]
pub struct InitConfig {
    /// The UID the proxy runs as: its own traffic is never captured (APPMESH_IGNORE_UID).
    #[arg(long, env = "TRELLIS_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The proxy's ingress port: inbound traffic to the app's ports goes there.
    #[arg(long, env = "TRELLIS_PROXY_INGRESS_PORT", default_value_t = 15000)]
    pub ingress_port: u16,
    /// The proxy's egress port: outbound traffic goes there.
    #[arg(long, env = "TRELLIS_PROXY_EGRESS_PORT", default_value_t = 15001)]
    pub egress_port: u16,
    /// The app's ports whose inbound traffic is captured (appmesh.k8s.aws/ports); none: no
    /// inbound capture.
    #[arg(long, env = "TRELLIS_PROXY_APP_PORTS", value_delimiter = ',')]
    pub app_ports: Vec<u16>,
    /// Outbound destination ports left alone (appmesh.k8s.aws/egressIgnoredPorts).
    #[arg(
        long,
        env = "TRELLIS_PROXY_EGRESS_IGNORED_PORTS",
        value_delimiter = ','
    )]
    pub egress_ignored_ports: Vec<u16>,
    /// Outbound destinations left alone, addresses or CIDRs (appmesh.k8s.aws/egressIgnoredIPs;
    /// e.g. the cloud's metadata service).
    #[arg(long, env = "TRELLIS_PROXY_EGRESS_IGNORED_IPS", value_delimiter = ',')]
    pub egress_ignored_ips: Vec<String>,
    /// Print the rules (iptables-restore input) instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
}

const INBOUND: &str = "TRELLIS_INBOUND";
const OUTPUT: &str = "TRELLIS_OUTPUT";

/// A CIDR or an address, checked (the rules take nothing else).
fn cidr(s: &str) -> Result<String, String> {
    let (addr, len) = s.split_once('/').unwrap_or((s, ""));
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("--egress-ignored-ips: {s:?} is not an address or CIDR"))?;
    if !ip.is_ipv4() {
        return Err(format!(
            "--egress-ignored-ips: {s:?}: IPv6 is not captured (iptables, not ip6tables)"
        ));
    }
    match len {
        "" => Ok(format!("{ip}/32")),
        n => match n.parse::<u8>() {
            Ok(n) if n <= 32 => Ok(format!("{ip}/{n}")),
            _ => Err(format!("--egress-ignored-ips: {s:?}: bad prefix length")),
        },
    }
}

/// The rules, as `iptables-restore --noflush` input: the chains (declared, so emptied), their
/// rules, and the jumps into them.
pub fn rules(c: &InitConfig) -> Result<String, String> {
    if c.ingress_port == 0 || c.egress_port == 0 {
        return Err("--ingress-port and --egress-port must not be 0".into());
    }
    let ignored_ips: Vec<String> = c
        .egress_ignored_ips
        .iter()
        .map(|s| cidr(s))
        .collect::<Result<_, _>>()?;
    let mut r = String::from("*nat\n");
    r.push_str(&format!(":{INBOUND} - [0:0]\n:{OUTPUT} - [0:0]\n"));
    for port in &c.app_ports {
        r.push_str(&format!(
            "-A {INBOUND} -p tcp --dport {port} -j REDIRECT --to-ports {}\n",
            c.ingress_port
        ));
    }
    // The proxy's own connections (to apps and upstreams) go where they are addressed.
    r.push_str(&format!(
        "-A {OUTPUT} -m owner --uid-owner {} -j RETURN\n",
        c.proxy_uid
    ));
    r.push_str(&format!("-A {OUTPUT} -d 127.0.0.0/8 -j RETURN\n"));
    for port in &c.egress_ignored_ports {
        r.push_str(&format!("-A {OUTPUT} -p tcp --dport {port} -j RETURN\n"));
    }
    for ip in &ignored_ips {
        r.push_str(&format!("-A {OUTPUT} -d {ip} -j RETURN\n"));
    }
    r.push_str(&format!(
        "-A {OUTPUT} -p tcp -j REDIRECT --to-ports {}\n",
        c.egress_port
    ));
    // As App Mesh's: inbound from other hosts, outbound to other hosts (not to the pod's own
    // addresses).
    r.push_str(&format!(
        "-A PREROUTING -p tcp -m addrtype ! --src-type LOCAL -j {INBOUND}\n"
    ));
    r.push_str(&format!(
        "-A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL -j {OUTPUT}\n"
    ));
    r.push_str("COMMIT\n");
    Ok(r)
}

/// Runs `trellis-proxy init` with `args` (after `init`).
pub fn main(args: impl IntoIterator<Item = String>) -> Result<(), String> {
    let c = <InitConfig as clap::Parser>::try_parse_from(args).map_err(|e| e.to_string())?;
    let rules = rules(&c)?;
    if c.dry_run {
        return std::io::stdout()
            .write_all(rules.as_bytes())
            .map_err(|e| e.to_string());
    }
    // The jumps from an earlier run go first, so that running again leaves one of each.
    for (chain, local, target) in [
        ("PREROUTING", "--src-type", INBOUND),
        ("OUTPUT", "--dst-type", OUTPUT),
    ] {
        while Command::new("iptables")
            .args([
                "-w", "-t", "nat", "-D", chain, "-p", "tcp", "-m", "addrtype", "!", local,
            ])
            .args(["LOCAL", "-j", target])
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run iptables: {e}"))?
            .success()
        {}
    }
    let mut restore = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run iptables-restore: {e}"))?;
    restore
        .stdin
        .take()
        .ok_or("iptables-restore has no stdin")?
        .write_all(rules.as_bytes())
        .map_err(|e| format!("iptables-restore: {e}"))?;
    let status = restore
        .wait()
        .map_err(|e| format!("iptables-restore: {e}"))?;
    if !status.success() {
        return Err(format!(
            "iptables-restore failed ({status}); the rules were:\n{rules}"
        ));
    }
    let _ = std::io::stderr().write_all(b"trellis-proxy init: traffic capture installed\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> InitConfig {
        let mut all = vec!["init"];
        all.extend(args);
        <InitConfig as clap::Parser>::try_parse_from(all).unwrap()
    }

    #[test]
    fn the_rules_capture_what_they_should_and_leave_the_rest() {
        let r = rules(&config(&[
            "--app-ports",
            "8080,9090",
            "--egress-ignored-ports",
            "22",
            "--egress-ignored-ips",
            "169.254.169.254,10.0.0.0/8",
        ]))
        .unwrap();
        for want in [
            "-A TRELLIS_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15000",
            "-A TRELLIS_INBOUND -p tcp --dport 9090 -j REDIRECT --to-ports 15000",
            "-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A TRELLIS_OUTPUT -p tcp --dport 22 -j RETURN",
            "-A TRELLIS_OUTPUT -d 169.254.169.254/32 -j RETURN",
            "-A TRELLIS_OUTPUT -d 10.0.0.0/8 -j RETURN",
            "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        ] {
            assert!(r.contains(want), "{want} not in\n{r}");
        }
        // The exceptions come before the redirect.
        assert!(r.find("--uid-owner").unwrap() < r.find("--to-ports 15001").unwrap());
        assert!(
            rules(&config(&["--egress-ignored-ips", "not-an-ip"]))
                .unwrap_err()
                .contains("not-an-ip")
        );
        assert!(rules(&config(&["--egress-ignored-ips", "10.0.0.0/40"])).is_err());
    }
}
