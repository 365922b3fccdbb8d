//! Export as pcapng (pcap-file crate): one Enhanced Packet Block per event
//! that carries packet bytes, link type RAW (the bytes start at the IP
//! header), nanosecond wall-clock timestamps, the drop kind and namespace
//! in the packet comment, capture metadata in the section header.

use std::{borrow::Cow, io::Write, time::Duration};

use pcap_file::{
    DataLink,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
            section_header::{SectionHeaderBlock, SectionHeaderOption},
        },
    },
};

use conntrack_trace_common::PKT_BYTES;

use crate::{
    drivers::offline::OfflineSpec,
    drivers::offline::ReportError,
    drivers::report::{self, Report, utc},
    formats::capture::{Header, OpenSet},
    kernel::workload::NetnsNames,
    model::event::Event,
};

/// What went into the pcapng.
pub struct PcapStats {
    pub packets: u64,
    /// Matching events without packet bytes (evictions have no skb).
    pub without_bytes: u64,
}

impl PcapStats {
    /// What the pcapng leaves out, if anything.
    pub fn warning(&self) -> Option<String> {
        (self.without_bytes > 0).then(|| {
            format!(
                "{} matching events carry no packet bytes (evictions have no packet) and are not in the pcapng; {} packets written",
                self.without_bytes, self.packets
            )
        })
    }
}

fn section(h: &Header) -> SectionHeaderBlock<'static> {
    let mut opts = vec![
        SectionHeaderOption::UserApplication(Cow::Owned(format!(
            "conntrack-trace {}",
            h.tool_version
        ))),
        SectionHeaderOption::OS(Cow::Owned(format!("Linux {}", h.kernel_release))),
        SectionHeaderOption::Comment(Cow::Owned(format!(
            "conntrack drops recorded on {} from {} (backend {}, evictions {}, namespace scope {})",
            h.hostname,
            utc(h.start_unix_ns),
            h.hooks,
            h.evictions,
            h.scope.netns
        ))),
    ];
    for n in &h.conntrack {
        opts.push(SectionHeaderOption::Comment(Cow::Owned(format!(
            "conntrack [{}] at start: {} / {} entries, {} buckets",
            n.netns, n.fill.count, n.fill.max, n.fill.buckets
        ))));
    }
    SectionHeaderBlock {
        options: opts,
        ..Default::default()
    }
}

fn comment(e: &Event, names: &NetnsNames) -> String {
    match names.get(&e.netns) {
        Some(n) => format!("{} netns {} ({n}) cpu {}", e.kind, e.netns, e.cpu),
        None => format!("{} netns {} cpu {}", e.kind, e.netns, e.cpu),
    }
}

pub fn export(
    set: OpenSet,
    filter: &OfflineSpec,
    out: impl Write,
) -> Result<(Report, PcapStats), ReportError> {
    let io = |source: std::io::Error| ReportError::Io {
        context: "writing pcapng".into(),
        source,
    };
    let pcap = |e: pcap_file::PcapError| match e {
        pcap_file::PcapError::IoError(e) => io(e),
        other => io(std::io::Error::other(other.to_string())),
    };
    let header = set.header().clone();
    let out = std::io::BufWriter::with_capacity(1 << 16, out);
    let mut w = PcapNgWriter::with_section_header(out, section(&header)).map_err(pcap)?;
    w.write_pcapng_block(InterfaceDescriptionBlock {
        linktype: DataLink::RAW,
        snaplen: PKT_BYTES as u32,
        options: vec![
            InterfaceDescriptionOption::IfName(Cow::Borrowed("conntrack-drops")),
            InterfaceDescriptionOption::IfDescription(Cow::Borrowed(
                "packets dropped by netfilter conntrack, from the network header on",
            )),
            InterfaceDescriptionOption::IfTsResol(9),
        ],
    })
    .map_err(pcap)?;
    let mut stats = PcapStats {
        packets: 0,
        without_bytes: 0,
    };
    let mut err = None;
    let (start_unix, start_mono) = (header.start_unix_ns, header.start_mono_ns);
    let r = report::build_set(set, filter, 10, |e, names, matched| {
        if !matched || err.is_some() {
            return;
        }
        if e.packet.is_empty() {
            stats.without_bytes += 1;
            return;
        }
        let wall = i128::try_from(start_unix)
            .unwrap_or(i128::MAX)
            .saturating_add(i128::from(e.ts_ns) - i128::from(start_mono))
            .max(0);
        let block = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_nanos(wall.min(u64::MAX as i128) as u64),
            original_len: e.packet.wire_len,
            data: Cow::Borrowed(e.packet.bytes()),
            options: vec![EnhancedPacketOption::Comment(Cow::Owned(comment(e, names)))],
        };
        match w.write_pcapng_block(block) {
            Ok(_) => stats.packets += 1,
            Err(e) => err = Some(e),
        }
    })?;
    if let Some(e) = err {
        return Err(pcap(e));
    }
    w.into_inner().flush().map_err(io)?;
    Ok((r, stats))
}
