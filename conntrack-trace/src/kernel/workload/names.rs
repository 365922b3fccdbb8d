//! [`NetnsNames`]: the namespace names the output uses, by inode, and the
//! workloads behind them.

use std::collections::{BTreeMap, btree_map};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Workload;

/// Known namespace names by inode, with the container/pod behind each
/// name where one was found. It reads like the `{inode: name}` map it
/// replaced (and serializes as exactly that map: the capture's NAMES
/// record); the workloads travel in their own WORKLOADS record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetnsNames {
    names: BTreeMap<u32, String>,
    workloads: BTreeMap<u32, Workload>,
}

impl NetnsNames {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn get(&self, inode: &u32) -> Option<&String> {
        self.names.get(inode)
    }
    pub fn insert(&mut self, inode: u32, name: String) -> Option<String> {
        self.names.insert(inode, name)
    }
    pub fn contains_key(&self, inode: &u32) -> bool {
        self.names.contains_key(inode)
    }
    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
    pub fn iter(&self) -> btree_map::Iter<'_, u32, String> {
        self.names.iter()
    }
    /// The container/pod owning namespace `inode`, if one was found.
    pub fn workload(&self, inode: u32) -> Option<&Workload> {
        self.workloads.get(&inode)
    }
    pub fn workloads(&self) -> &BTreeMap<u32, Workload> {
        &self.workloads
    }
    pub fn set_workload(&mut self, inode: u32, w: Workload) {
        self.workloads.insert(inode, w);
    }
    /// Replaces the workloads (a capture's WORKLOADS record).
    pub fn set_workloads(&mut self, w: BTreeMap<u32, Workload>) {
        self.workloads = w;
    }
}

impl FromIterator<(u32, String)> for NetnsNames {
    fn from_iter<I: IntoIterator<Item = (u32, String)>>(it: I) -> Self {
        NetnsNames {
            names: it.into_iter().collect(),
            workloads: BTreeMap::new(),
        }
    }
}

impl<'a> IntoIterator for &'a NetnsNames {
    type Item = (&'a u32, &'a String);
    type IntoIter = btree_map::Iter<'a, u32, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.names.iter()
    }
}

impl Serialize for NetnsNames {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.names.serialize(s)
    }
}

impl<'de> Deserialize<'de> for NetnsNames {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(NetnsNames {
            names: BTreeMap::deserialize(d)?,
            workloads: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::workload::{Container, Runtime, Source};

    fn docker_web() -> Workload {
        Workload {
            container: Some(Container {
                runtime: Runtime::Docker,
                id: "bc476804eb2af2157d625626809925a1bfa429e356d96195f836ba4a4dc30f0d".into(),
                name: Some("web".into()),
                image: Some("ctt-busybox:test".into()),
                namespace: None,
                source: Source::Api,
            }),
            pod: None,
        }
    }

    #[test]
    fn capture_records_carry_the_workloads() {
        use crate::formats::capture::format::{self, FRAME_BYTES, Record, rtype};
        let mut n = NetnsNames::new();
        n.insert(7, "docker:web".into());
        let mut buf = Vec::new();
        format::frame_workloads(&mut buf, &n);
        assert!(buf.is_empty(), "no WORKLOADS record without workloads");
        n.set_workload(7, docker_web());
        format::frame_json(&mut buf, rtype::NAMES, &n);
        let names_len = buf.len();
        format::frame_workloads(&mut buf, &n);
        let names = format::decode_body(&buf[FRAME_BYTES..names_len]).unwrap();
        let Record::Names(mut got) = names else {
            panic!("{names:?}")
        };
        let w = format::decode_body(&buf[names_len + FRAME_BYTES..]).unwrap();
        let Record::Workloads(w) = w else {
            panic!("{w:?}")
        };
        got.set_workloads(w);
        assert_eq!(got, n);
    }

    #[test]
    fn ndjson_events_name_the_container() {
        use crate::{
            formats::output::{Sink, ndjson::Ndjson},
            model::event::{Event, Kind, Proto},
        };
        let mut n = NetnsNames::new();
        n.insert(7, "docker:web".into());
        n.set_workload(7, docker_web());
        let e = Event {
            kind: Kind::TableFull,
            ts_ns: 1,
            cpu: 0,
            netns: 7,
            proto: Proto::UDP,
            src: Some("10.0.0.7".parse().unwrap()),
            dst: Some("10.0.0.53".parse().unwrap()),
            sport: 4000,
            dport: 53,
            reply: None,
            packet: Default::default(),
            sample: 1,
        };
        let mut s = Ndjson::new(Vec::new());
        s.event(&e, &n).unwrap();
        let line = String::from_utf8(s.into_inner()).unwrap();
        assert_eq!(
            line.trim(),
            r#"{"type":"event","kind":"table_full","ts_ns":1,"cpu":0,"netns":7,"netns_name":"docker:web","container":{"runtime":"docker","id":"bc476804eb2af2157d625626809925a1bfa429e356d96195f836ba4a4dc30f0d","name":"web","image":"ctt-busybox:test","source":"api"},"family":"ipv4","proto":"udp","src":"10.0.0.7","dst":"10.0.0.53","sport":4000,"dport":53,"sample":1}"#
        );
    }

    #[test]
    fn serializes_as_the_plain_names_map() {
        let mut n = NetnsNames::new();
        n.insert(7, "srv".into());
        n.set_workload(
            7,
            Workload {
                container: Some(Container {
                    runtime: Runtime::Docker,
                    id: "ab".into(),
                    name: Some("web".into()),
                    image: None,
                    namespace: None,
                    source: Source::Api,
                }),
                pod: None,
            },
        );
        let j = serde_json::to_string(&n).unwrap();
        assert_eq!(j, r#"{"7":"srv"}"#);
        let back: NetnsNames = serde_json::from_str(&j).unwrap();
        assert_eq!(back.get(&7).map(String::as_str), Some("srv"));
        assert!(back.workloads().is_empty());
    }
}
