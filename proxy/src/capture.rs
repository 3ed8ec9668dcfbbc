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
    /// IPv6 capture (ip6tables): `auto` installs it where IPv6 is enabled in the network
    /// namespace (and fails if it cannot: IPv6 traffic would bypass the proxy), `on` always,
    /// `off` never (only where nothing speaks IPv6). The proxy serves IPv6 captured traffic on
    /// --ipv6-ingress-addr `[::]:15000` and --ipv6-egress-addr `[::1]:15001`.
    #[arg(long, env = "TRELLIS_PROXY_IPV6", value_enum, default_value = "auto")]
    pub ipv6: Ipv6Mode,
    /// Print the rules (iptables-restore and ip6tables-restore input) instead of installing
    /// them.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Mode {
    Auto,
    On,
    Off,
}

/// An address family's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn tool(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }
}

const INBOUND: &str = "TRELLIS_INBOUND";
const OUTPUT: &str = "TRELLIS_OUTPUT";

/// A CIDR or an address, checked (the rules take nothing else), with its family.
fn cidr(s: &str) -> Result<(Family, String), String> {
    let (addr, len) = s.split_once('/').unwrap_or((s, ""));
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("--egress-ignored-ips: {s:?} is not an address or CIDR"))?;
    let (family, max) = if ip.is_ipv4() {
        (Family::V4, 32)
    } else {
        (Family::V6, 128)
    };
    match len {
        "" => Ok((family, format!("{ip}/{max}"))),
        n => match n.parse::<u8>() {
            Ok(n) if n <= max => Ok((family, format!("{ip}/{n}"))),
            _ => Err(format!("--egress-ignored-ips: {s:?}: bad prefix length")),
        },
    }
}

/// The IPv4 rules, as `iptables-restore --noflush` input: the chains (declared, so emptied),
/// their rules, and the jumps into them.
pub fn rules(c: &InitConfig) -> Result<String, String> {
    rules_for(c, Family::V4)
}

/// The rules of `family` (`ip6tables-restore` input for IPv6).
pub fn rules_for(c: &InitConfig, family: Family) -> Result<String, String> {
    if c.ingress_port == 0 || c.egress_port == 0 {
        return Err("--ingress-port and --egress-port must not be 0".into());
    }
    let mut ignored_ips = Vec::new();
    for s in &c.egress_ignored_ips {
        let (f, cidr) = cidr(s)?;
        if f == family {
            ignored_ips.push(cidr);
        }
    }
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
    r.push_str(&format!("-A {OUTPUT} -d {} -j RETURN\n", family.loopback()));
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
    let v4 = rules_for(&c, Family::V4)?;
    let v6 = rules_for(&c, Family::V6)?;
    let with_v6 = match c.ipv6 {
        Ipv6Mode::On => true,
        Ipv6Mode::Off => false,
        // /proc/sys/net is the network namespace's own.
        Ipv6Mode::Auto => std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
            .is_ok_and(|v| v.trim() == "0"),
    };
    if c.dry_run {
        let mut out = format!("# iptables-restore --noflush\n{v4}");
        if with_v6 {
            out.push_str(&format!("# ip6tables-restore --noflush\n{v6}"));
        }
        return std::io::stdout()
            .write_all(out.as_bytes())
            .map_err(|e| e.to_string());
    }
    install(Family::V4, &v4)?;
    if with_v6 {
        install(Family::V6, &v6)?;
    }
    let _ = std::io::stderr().write_all(if with_v6 {
        b"trellis-proxy init: traffic capture installed (IPv4, IPv6)\n"
    } else {
        b"trellis-proxy init: traffic capture installed (IPv4)\n"
    });
    Ok(())
}

/// Replaces `family`'s capture rules with `rules`.
fn install(family: Family, rules: &str) -> Result<(), String> {
    let tool = family.tool();
    // The jumps from an earlier run go first, so that running again leaves one of each.
    for (chain, local, target) in [
        ("PREROUTING", "--src-type", INBOUND),
        ("OUTPUT", "--dst-type", OUTPUT),
    ] {
        while Command::new(tool)
            .args([
                "-w", "-t", "nat", "-D", chain, "-p", "tcp", "-m", "addrtype", "!", local,
            ])
            .args(["LOCAL", "-j", target])
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run {tool}: {e}"))?
            .success()
        {}
    }
    let restore_tool = format!("{tool}-restore");
    let mut restore = Command::new(&restore_tool)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {restore_tool}: {e}"))?;
    restore
        .stdin
        .take()
        .ok_or_else(|| format!("{restore_tool} has no stdin"))?
        .write_all(rules.as_bytes())
        .map_err(|e| format!("{restore_tool}: {e}"))?;
    let status = restore.wait().map_err(|e| format!("{restore_tool}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "{restore_tool} failed ({status}); the rules were:\n{rules}"
        ));
    }
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

    #[test]
    fn each_family_gets_its_own_loopback_and_ignored_addresses() {
        let c = config(&[
            "--egress-ignored-ips",
            "169.254.169.254,fd00:ec2::254,10.0.0.0/8",
        ]);
        let v4 = rules_for(&c, Family::V4).unwrap();
        let v6 = rules_for(&c, Family::V6).unwrap();
        assert!(
            v4.contains("-d 127.0.0.0/8 -j RETURN") && !v4.contains("::"),
            "{v4}"
        );
        assert!(v6.contains("-d ::1/128 -j RETURN"), "{v6}");
        assert!(v6.contains("-d fd00:ec2::254/128 -j RETURN"), "{v6}");
        assert!(!v6.contains("10.0.0.0") && !v6.contains("169.254"), "{v6}");
        assert!(v6.contains("-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(rules_for(&config(&["--egress-ignored-ips", "fd00::/129"]), Family::V6).is_err());
    }
}
