//! JUnit XML, in the schema the Jenkins, GitLab and GitHub test reporters
//! read: `<testsuites>` › `<testsuite>` › `<testcase>` with `<failure>`,
//! `<skipped>` and `<system-out>`, and `tests`/`failures`/`errors`/
//! `skipped`/`time` counts on both containers.
//!
//! Console text goes in verbatim apart from what XML 1.0 cannot carry:
//! quick-xml escapes `<`, `&`, `>` (so `]]>` is harmless), and control
//! characters other than tab, newline and carriage return become their
//! Unicode "control picture" (ESC → `␛`), so a splat excerpt with a stray
//! escape sequence still gives a file every reporter parses.

use anyhow::{Context, Result};
use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesText, Event};
use std::path::Path;

/// How one test case ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Passed,
    /// `message`: one line (the first failure); `text`: everything else.
    Failed {
        message: String,
        text: String,
    },
    Skipped {
        message: String,
    },
}

/// One `<testcase>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub name: String,
    /// Reporters group cases by it (`scenario.fencelab`, `boot.smoke`).
    pub classname: String,
    pub time_secs: f64,
    pub outcome: Outcome,
    pub system_out: Option<String>,
}

/// Writes `cases` as one test suite named `suite_name` to `path`.
pub fn write(path: &Path, suite_name: &str, cases: &[Case]) -> Result<()> {
    let xml = render(suite_name, cases)
        .with_context(|| format!("rendering JUnit XML for {}", path.display()))?;
    std::fs::write(path, xml).with_context(|| format!("writing {}", path.display()))
}

/// The JUnit XML document for `cases` as one suite.
pub fn render(suite_name: &str, cases: &[Case]) -> std::io::Result<String> {
    let failures = cases
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Failed { .. }))
        .count();
    let skipped = cases
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Skipped { .. }))
        .count();
    let time: f64 = cases.iter().map(|c| c.time_secs.max(0.0)).sum();
    let (tests, failures, skipped, time) = (
        cases.len().to_string(),
        failures.to_string(),
        skipped.to_string(),
        seconds(time),
    );
    let name = xml_safe(suite_name);
    let counts = [
        ("name", name.as_str()),
        ("tests", tests.as_str()),
        ("failures", failures.as_str()),
        ("errors", "0"),
        ("skipped", skipped.as_str()),
        ("time", time.as_str()),
    ];
    let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
    writer.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
    writer
        .create_element("testsuites")
        .with_attributes(counts)
        .write_inner_content(|w| {
            w.create_element("testsuite")
                .with_attributes(counts)
                .write_inner_content(|w| cases.iter().try_for_each(|case| write_case(w, case)))
                .map(drop)
        })?;
    let mut xml = String::from_utf8(writer.into_inner())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    xml.push('\n');
    Ok(xml)
}

fn write_case(w: &mut Writer<Vec<u8>>, case: &Case) -> std::io::Result<()> {
    let (name, classname, time) = (
        xml_safe(&case.name),
        xml_safe(&case.classname),
        seconds(case.time_secs),
    );
    let element = w.create_element("testcase").with_attributes([
        ("name", name.as_str()),
        ("classname", classname.as_str()),
        ("time", time.as_str()),
    ]);
    if case.outcome == Outcome::Passed && case.system_out.is_none() {
        return element.write_empty().map(drop);
    }
    element
        .write_inner_content(|w| {
            match &case.outcome {
                Outcome::Passed => {}
                Outcome::Failed { message, text } => {
                    let message = xml_safe(message);
                    w.create_element("failure")
                        .with_attributes([("message", message.as_str()), ("type", "failure")])
                        .write_text_content(BytesText::new(&xml_safe(text)))?;
                }
                Outcome::Skipped { message } => {
                    let message = xml_safe(message);
                    w.create_element("skipped")
                        .with_attribute(("message", message.as_str()))
                        .write_empty()?;
                }
            }
            if let Some(out) = &case.system_out {
                w.create_element("system-out")
                    .write_text_content(BytesText::new(&xml_safe(out)))?;
            }
            Ok(())
        })
        .map(drop)
}

fn seconds(secs: f64) -> String {
    format!("{:.3}", if secs.is_finite() { secs.max(0.0) } else { 0.0 })
}

/// `text` with the characters XML 1.0 forbids replaced by their control
/// pictures (U+2400 + code; DEL → U+2421).
fn xml_safe(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            '\u{0}'..='\u{1f}' => char::from_u32(0x2400 + c as u32).unwrap_or('\u{fffd}'),
            '\u{7f}' => '\u{2421}',
            '\u{fffe}' | '\u{ffff}' => '\u{fffd}',
            _ => c,
        })
        .collect()
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use quick_xml::Reader;
    use quick_xml::events::BytesStart;
    use std::collections::BTreeMap;

    /// One element read back: its name, attributes, text and children.
    #[derive(Debug, Default)]
    pub struct Element {
        pub name: String,
        pub attributes: BTreeMap<String, String>,
        pub text: String,
        pub children: Vec<Element>,
    }

    impl Element {
        pub fn child(&self, name: &str) -> Option<&Element> {
            self.children.iter().find(|c| c.name == name)
        }

        pub fn attr(&self, name: &str) -> &str {
            self.attributes.get(name).map_or("", String::as_str)
        }
    }

    fn element(start: &BytesStart<'_>) -> Element {
        Element {
            name: String::from_utf8(start.name().as_ref().to_vec()).unwrap(),
            attributes: start
                .attributes()
                .map(|a| {
                    let a = a.expect("well-formed attribute");
                    (
                        String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                        a.unescape_value().expect("escaped attribute").into_owned(),
                    )
                })
                .collect(),
            ..Element::default()
        }
    }

    /// Parses an XML document with quick-xml's reader (which rejects
    /// mismatched tags and bad references) into its root element.
    pub fn parse(xml: &str) -> Element {
        let mut reader = Reader::from_str(xml);
        let mut stack: Vec<Element> = vec![Element::default()];
        loop {
            match reader.read_event().expect("well-formed XML") {
                Event::Start(start) => stack.push(element(&start)),
                Event::Empty(start) => stack.last_mut().unwrap().children.push(element(&start)),
                Event::End(_) => {
                    let done = stack.pop().unwrap();
                    stack.last_mut().unwrap().children.push(done);
                }
                Event::Text(text) => stack
                    .last_mut()
                    .unwrap()
                    .text
                    .push_str(&text.xml_content().unwrap()),
                Event::GeneralRef(reference) => {
                    let resolved = match reference.resolve_char_ref().unwrap() {
                        Some(c) => c.to_string(),
                        None => {
                            let name = reference.decode().unwrap();
                            quick_xml::escape::resolve_predefined_entity(&name)
                                .unwrap_or_else(|| panic!("unknown entity &{name};"))
                                .to_owned()
                        }
                    };
                    stack.last_mut().unwrap().text.push_str(&resolved);
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(stack.len(), 1, "unclosed elements");
        let mut document = stack.pop().unwrap();
        assert_eq!(document.children.len(), 1, "one root element");
        document.children.pop().unwrap()
    }

    fn case(name: &str, outcome: Outcome) -> Case {
        Case {
            name: name.into(),
            classname: "scenario.fencelab".into(),
            time_secs: 1.5,
            outcome,
            system_out: None,
        }
    }

    #[test]
    fn structure_and_counts_are_what_reporters_read() {
        let cases = [
            case("smoke", Outcome::Passed),
            case(
                "deadline-race",
                Outcome::Failed {
                    message: "kernel splat: [kasan] BUG: KASAN".into(),
                    text: "reason: …\nreproduce: cargo xtask boot --seed 7".into(),
                },
            ),
            case(
                "reset",
                Outcome::Skipped {
                    message: "virtio_gpu cannot reset".into(),
                },
            ),
        ];
        let root = parse(&render("fencelab scenarios", &cases).unwrap());
        assert_eq!(root.name, "testsuites");
        let suite = root.child("testsuite").expect("one testsuite");
        for container in [&root, suite] {
            assert_eq!(container.attr("tests"), "3");
            assert_eq!(container.attr("failures"), "1");
            assert_eq!(container.attr("errors"), "0");
            assert_eq!(container.attr("skipped"), "1");
            assert_eq!(container.attr("time"), "4.500");
            assert_eq!(container.attr("name"), "fencelab scenarios");
        }
        let names: Vec<&str> = suite.children.iter().map(|c| c.attr("name")).collect();
        assert_eq!(names, ["smoke", "deadline-race", "reset"]);
        assert!(suite.children.iter().all(|c| c.name == "testcase"));
        assert!(suite.children[0].children.is_empty());
        let failure = suite.children[1].child("failure").unwrap();
        assert_eq!(failure.attr("message"), "kernel splat: [kasan] BUG: KASAN");
        assert_eq!(
            failure.text,
            "reason: …\nreproduce: cargo xtask boot --seed 7"
        );
        let skipped = suite.children[2].child("skipped").unwrap();
        assert_eq!(skipped.attr("message"), "virtio_gpu cannot reset");
        assert_eq!(suite.children[2].attr("classname"), "scenario.fencelab");
    }

    #[test]
    fn hostile_console_text_survives_the_round_trip() {
        let hostile = "<testcase name=\"x\"> & ]]> </system-out>\u{1b}[31mred\u{1b}[0m\u{0}\u{7}\u{7f}\ttab\r\nend";
        let mut failing = case(
            "a<b&\"c\"",
            Outcome::Failed {
                message: hostile.into(),
                text: hostile.into(),
            },
        );
        failing.system_out = Some(hostile.into());
        let xml = render("suite & <co>", &[failing]).unwrap();
        assert!(!xml.contains("]]>"), "{xml}");
        assert!(!xml.chars().any(|c| c == '\u{1b}' || c == '\u{0}'), "{xml}");
        let root = parse(&xml);
        assert_eq!(root.attr("name"), "suite & <co>");
        let case = root.child("testsuite").unwrap().child("testcase").unwrap();
        assert_eq!(case.attr("name"), "a<b&\"c\"");
        // Control characters become pictures; CRLF reads back as LF, as
        // every XML parser normalises line ends.
        let expected = "<testcase name=\"x\"> & ]]> </system-out>␛[31mred␛[0m␀␇␡\ttab\nend";
        assert_eq!(case.child("failure").unwrap().text, expected);
        assert_eq!(case.child("system-out").unwrap().text, expected);
        assert!(
            case.child("failure")
                .unwrap()
                .attr("message")
                .contains("]]>")
        );
    }

    #[test]
    fn writes_the_file_and_names_it_in_errors() {
        let dir = std::env::temp_dir().join(format!("fencelab-junit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("junit.xml");
        write(&path, "s", &[case("one", Outcome::Passed)]).unwrap();
        let root = parse(&std::fs::read_to_string(&path).unwrap());
        assert_eq!(root.child("testsuite").unwrap().attr("tests"), "1");
        let err = write(&dir.join("missing/junit.xml"), "s", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("missing/junit.xml"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
