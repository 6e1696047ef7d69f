//! `shm-layout.md` and the code agree: the worked example is the real writer's output byte for
//! byte, its records decode to what the document says, and the document's tables of header fields,
//! gauge modes and constants match the constants in `shmetrics::layout`.
//!
//! To regenerate the dump after an intentional format change:
//! `SHMETRICS_PRINT_EXAMPLE=1 cargo test --test it layout_doc -- --nocapture`, then paste it into
//! the document (and bump the format version if old readers cannot read the new bytes).

use shmetrics::layout::{
    self, decode_record, flags, header, kind, record_len, GaugeMode, MetricDesc, MetricType, Record,
    ValueType,
};
use shmetrics::writer::Registry;

/// The document, as shipped.
const DOC: &str = include_str!("../../shm-layout.md");

/// Fixed values the document shows for the fields that differ from run to run.
const DOC_PID: u64 = 4242;
const DOC_START_TIME_NS: u64 = 1_700_000_000_000_000_000;
const DOC_FILE_ID: [u8; 16] =
    [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
const DOC_PARENT_PID: u64 = 0;

/// The lines strictly between the line `begin` and the line `end` of the document.
fn doc_section(begin: &str, end: &str) -> Vec<&'static str> {
    let mut lines = DOC.lines();
    lines.by_ref().find(|l| l.trim() == begin).unwrap_or_else(|| panic!("shm-layout.md has no line {begin}"));
    let section: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != end).collect();
    assert!(DOC.lines().any(|l| l.trim() == end), "shm-layout.md has no line {end}");
    section
}

/// The contents of the one fenced code block between `begin` and `end`, one `\n` per line.
fn doc_code_block(begin: &str, end: &str) -> String {
    let section = doc_section(begin, end);
    let fences: Vec<usize> = (0..section.len()).filter(|&i| section[i].starts_with("```")).collect();
    assert_eq!(fences.len(), 2, "expected one fenced block between {begin} and {end}");
    section[fences[0] + 1..fences[1]].iter().map(|l| format!("{l}\n")).collect()
}

/// The cells of the data rows of the Markdown tables between `begin` and `end`.
fn doc_table_rows(begin: &str, end: &str) -> Vec<Vec<String>> {
    doc_section(begin, end)
        .into_iter()
        .filter(|l| l.trim_start().starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect::<Vec<String>>()
        })
        // Drop header rows (first cell not a number) and separator rows (`---`).
        .filter(|cells| parse_num(&cells[0]).is_some())
        .collect()
}

/// Parses `123`, `0x7b` or `64 KiB`-free plain numbers as they appear in the tables.
fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `hexdump -C` of `bytes`: 16 bytes a line, runs of identical lines squeezed to `*`, and a last
/// line with the length.
fn hexdump_c(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut prev: Option<&[u8]> = None;
    let mut squeezing = false;
    for (i, line) in bytes.chunks(16).enumerate() {
        if line.len() == 16 && prev == Some(line) {
            if !squeezing {
                out.push_str("*\n");
                squeezing = true;
            }
            continue;
        }
        squeezing = false;
        prev = Some(line);
        out.push_str(&format!("{:08x} ", i * 16));
        for j in 0..16 {
            if j % 8 == 0 {
                out.push(' ');
            }
            match line.get(j) {
                Some(b) => out.push_str(&format!("{b:02x} ")),
                None => out.push_str("   "),
            }
        }
        out.push_str(" |");
        for &b in line {
            out.push(if (0x20..0x7f).contains(&b) { b as char } else { '.' });
        }
        out.push_str("|\n");
    }
    out.push_str(&format!("{:08x}\n", bytes.len()));
    out
}

fn u64_at(bytes: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"))
}

fn put_u64(bytes: &mut [u8], off: u64, v: u64) {
    let o = off as usize;
    bytes[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes the example of the document with the real writer; returns the file's bytes up to `used`,
/// with the run-dependent header fields replaced by the document's fixed values.
fn example_file() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::open(dir.path()).expect("open registry");
    let jobs = registry.counter("jobs_total", "Jobs done.").expect("counter");
    for _ in 0..3 {
        jobs.inc();
    }
    let latency = registry
        .histogram_family("latency_seconds", "Request latency.", &[0.1, 1.0], &["method"])
        .expect("histogram");
    let get = latency.with_labels(&["GET"]).expect("series");
    get.observe(0.05);
    get.observe(0.5);

    let path = registry.path().expect("registry has a file");
    let mut bytes = std::fs::read(&path).expect("read the writer's file");
    let used = u64_at(&bytes, header::USED);
    assert!(used <= bytes.len() as u64, "used {used} is past the end of the file");
    bytes.truncate(used as usize);

    // The fields the document fixes are the ones that depend on the run; check what they held.
    let name = path.file_name().and_then(|n| n.to_str()).expect("utf-8 file name");
    let pid = u64_at(&bytes, header::PID);
    assert_eq!(pid, u64::from(std::process::id()));
    let id = header::FILE_ID as usize;
    let file_id: [u8; 16] = bytes[id..id + 16].try_into().expect("16 bytes");
    assert_eq!(name, format!("w-{pid}-{}.shm", layout::file_id_hex(&file_id)));
    assert_eq!(u64_at(&bytes, header::PARENT_PID), 0);
    assert!(u64_at(&bytes, header::START_TIME_NS) > DOC_START_TIME_NS);

    put_u64(&mut bytes, header::PID, DOC_PID);
    put_u64(&mut bytes, header::START_TIME_NS, DOC_START_TIME_NS);
    bytes[id..id + 16].copy_from_slice(&DOC_FILE_ID);
    put_u64(&mut bytes, header::PARENT_PID, DOC_PARENT_PID);
    bytes
}

#[test]
fn worked_example_matches_the_writer() {
    let bytes = example_file();
    let dump = hexdump_c(&bytes);
    if std::env::var_os("SHMETRICS_PRINT_EXAMPLE").is_some() {
        println!("{dump}");
    }
    let documented = doc_code_block("<!-- worked-example-begin -->", "<!-- worked-example-end -->");
    assert_eq!(documented, dump, "the worked example in shm-layout.md differs from what the writer produces");

    // The header, field by field.
    layout::check_header(&bytes).expect("valid header");
    assert_eq!(&bytes[..8], b"SHMETRIC");
    assert_eq!(u64_at(&bytes, header::USED), bytes.len() as u64);
    assert_eq!(u64_at(&bytes, header::FLAGS), 0);
    assert_eq!(u64_at(&bytes, header::DROPPED_SERIES), 0);
    assert_eq!(u64_at(&bytes, header::DROPPED_UPDATES), 0);
    assert_eq!(u64_at(&bytes, header::RESERVE), shmetrics::writer::DEFAULT_RESERVE);
    assert_eq!(u64_at(&bytes, header::SHARED_FORKS), 0);
    assert!(bytes[header::END as usize..layout::HEADER_SIZE as usize].iter().all(|b| *b == 0));

    // The records, decoded with the library's own decoder.
    let mut records = Vec::new();
    let mut off = layout::HEADER_SIZE as usize;
    while off < bytes.len() {
        let len = record_len(&bytes[off..]).expect("record length");
        let record = decode_record(&bytes[off..off + len]).expect("record decodes");
        records.push((off, len, record));
        off += len;
    }
    assert_eq!(off, bytes.len(), "records end exactly at `used`");

    let jobs = MetricDesc {
        name: "jobs".into(),
        help: "Jobs done.".into(),
        metric_type: MetricType::Counter,
        value_type: ValueType::U64,
        gauge_mode: None,
        label_names: vec![],
        buckets: vec![],
        states: Vec::new(),
    };
    let latency = MetricDesc {
        name: "latency_seconds".into(),
        help: "Request latency.".into(),
        metric_type: MetricType::Histogram,
        value_type: ValueType::F64,
        gauge_mode: None,
        label_names: vec!["method".into()],
        buckets: vec![0.1, 1.0],
        states: Vec::new(),
    };
    let expected = vec![
        (0x1000, 48, Record::Metric { id: 0, desc: jobs }),
        (0x1030, 32, Record::Series { metric_id: 0, label_values: vec![], slots: 1, slots_offset: 24 }),
        (0x1050, 96, Record::Metric { id: 1, desc: latency }),
        (
            0x10b0,
            64,
            Record::Series { metric_id: 1, label_values: vec!["GET".into()], slots: 4, slots_offset: 32 },
        ),
    ];
    assert_eq!(records, expected);

    // The value slots.
    assert_eq!(u64_at(&bytes, 0x1030 + 24), 3, "jobs");
    let hist = 0x10b0 + 32;
    assert_eq!(u64_at(&bytes, hist), 1, "bucket le=0.1");
    assert_eq!(u64_at(&bytes, hist + 8), 1, "bucket le=1.0");
    assert_eq!(u64_at(&bytes, hist + 16), 0, "bucket le=+Inf");
    assert_eq!(f64::from_bits(u64_at(&bytes, hist + 24)), 0.0 + 0.05 + 0.5, "sum");
}

#[test]
fn header_table_matches_the_constants() {
    let rows = doc_table_rows("<!-- header-table-begin -->", "<!-- header-table-end -->");
    let fields: Vec<(u64, u64, &str)> = rows
        .iter()
        .map(|r| (parse_num(&r[0]).expect("offset"), parse_num(&r[1]).expect("size"), r[3].as_str()))
        .collect();
    let expected = [
        (header::MAGIC, 8, "magic"),
        (header::VERSION, 4, "version"),
        (header::HEADER_SIZE, 4, "header_size"),
        (header::USED, 8, "used"),
        (header::FLAGS, 8, "flags"),
        (header::PID, 8, "pid"),
        (header::START_TIME_NS, 8, "start_time_ns"),
        (header::FILE_ID, 16, "file_id"),
        (header::DROPPED_SERIES, 8, "dropped_series"),
        (header::DROPPED_UPDATES, 8, "dropped_updates"),
        (header::RESERVE, 8, "reserve"),
        (header::PARENT_PID, 8, "parent_pid"),
        (header::SHARED_FORKS, 8, "shared_forks"),
        (header::END, layout::HEADER_SIZE - header::END, "(zero)"),
    ];
    assert_eq!(fields, expected);
    // The fields tile the header without gaps.
    for w in fields.windows(2) {
        assert_eq!(w[0].0 + w[0].1, w[1].0, "gap or overlap after {}", w[0].2);
    }
}

#[test]
fn gauge_mode_table_matches_the_code() {
    let rows = doc_table_rows("<!-- gauge-modes-begin -->", "<!-- gauge-modes-end -->");
    let documented: Vec<(u64, &str)> =
        rows.iter().map(|r| (parse_num(&r[0]).expect("code"), r[1].as_str())).collect();
    let code: Vec<(u64, &str)> = GaugeMode::ALL.iter().map(|m| (u64::from(m.code()), m.as_str())).collect();
    assert_eq!(documented, code);
    for (r, m) in rows.iter().zip(GaugeMode::ALL) {
        assert_eq!(r[2], if m.has_timestamp() { "2" } else { "1" }, "slots of {}", m.as_str());
        assert_eq!(r[3], if m.is_live() { "dropped" } else { "kept" }, "dead writers, {}", m.as_str());
    }
}

#[test]
fn constants_table_matches_the_code() {
    let rows = doc_table_rows("<!-- constants-begin -->", "<!-- constants-end -->");
    let documented: Vec<(u64, &str)> =
        rows.iter().map(|r| (parse_num(&r[0]).expect("value"), r[1].as_str())).collect();
    let expected = [
        (u64::from(layout::VERSION), "VERSION"),
        (layout::HEADER_SIZE, "HEADER_SIZE"),
        (layout::RECORD_HEADER as u64, "RECORD_HEADER"),
        (layout::METRIC_FIXED as u64, "METRIC_FIXED"),
        (layout::SERIES_FIXED as u64, "SERIES_FIXED"),
        (layout::MAX_STRING as u64, "MAX_STRING"),
        (layout::MAX_LABELS as u64, "MAX_LABELS"),
        (layout::MAX_BUCKETS as u64, "MAX_BUCKETS"),
        (u64::from(kind::METRIC), "KIND_METRIC"),
        (u64::from(kind::SERIES), "KIND_SERIES"),
        (flags::READY, "FLAG_READY"),
        (flags::CLEAN_EXIT, "FLAG_CLEAN_EXIT"),
    ];
    assert_eq!(documented, expected);
    assert_eq!(&layout::MAGIC, b"SHMETRIC");
}
