//! The parts of a Label Studio labeling config (its XML) the back end needs: the image tag, the
//! tag its regions go to (`BrushLabels` or `PolygonLabels`) with its labels, and the optional
//! per-region `TextArea` (the description) and `Choices` (the category).
//!
//! Labeling configs are small, flat XML; a tag scanner (names, attributes, nesting) is enough and
//! needs no XML library. Entities other than the five predefined ones are left as written.

use std::collections::HashMap;

/// One tag: its name and attributes, and where it sits.
#[derive(Debug, Clone)]
struct Tag {
    name: String,
    attributes: HashMap<String, String>,
    /// Index of the enclosing tag in the scan order.
    parent: Option<usize>,
}

impl Tag {
    fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).map(String::as_str)
    }

    fn is_per_region(&self) -> bool {
        self.attribute("perRegion").is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// `toName` may list several targets, comma-separated.
    fn targets(&self, image: &str) -> bool {
        self.attribute("toName").is_some_and(|t| t.split(',').any(|t| t.trim() == image))
    }
}

/// How the back end writes regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// `BrushLabels`: the mask itself, as brush RLE.
    Brush,
    /// `PolygonLabels`: the mask's outline.
    Polygon,
}

impl RegionKind {
    /// The result `type` and the value key holding its labels.
    pub fn result_type(self) -> &'static str {
        match self {
            Self::Brush => "brushlabels",
            Self::Polygon => "polygonlabels",
        }
    }
}

/// A control tag and the values it offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    pub name: String,
    pub values: Vec<String>,
}

/// What the back end reads from a labeling config.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelConfig {
    /// The `Image` tag's name (results' `to_name`).
    pub image_name: String,
    /// The task data field holding the image (the `Image` tag's `value` without its `$`).
    pub image_field: String,
    pub region_kind: RegionKind,
    /// The `BrushLabels`/`PolygonLabels` tag and its `Label` values.
    pub regions: Control,
    /// A per-region `TextArea` for the description.
    pub description: Option<Control>,
    /// A per-region `Choices` for the category, with its `Choice` values.
    pub category: Option<Control>,
}

impl LabelConfig {
    /// Reads a labeling config; the error says what is missing for this back end.
    pub fn parse(xml: &str) -> Result<Self, String> {
        if xml.trim().is_empty() {
            return Err("the labeling config is empty".into());
        }
        let tags = scan(xml)?;
        let image = tags.iter().find(|t| t.name == "Image").ok_or(
            "the labeling config has no <Image> tag: this back end segments and describes image regions",
        )?;
        let image_name = image.attribute("name").ok_or("the <Image> tag has no name attribute")?.to_string();
        let image_field = image
            .attribute("value")
            .and_then(|v| v.strip_prefix('$'))
            .filter(|v| !v.is_empty())
            .ok_or("the <Image> tag's value must name a task field, as value=\"$image\"")?
            .to_string();
        let children = |index: usize, child: &str| -> Vec<String> {
            tags.iter()
                .filter(|t| t.name == child && t.parent == Some(index))
                .filter_map(|t| t.attribute("value").or(t.attribute("alias")).map(str::to_string))
                .collect()
        };
        let control = |index: usize, child: &str| -> Result<Control, String> {
            let tag: &Tag = &tags[index];
            let name =
                tag.attribute("name").ok_or_else(|| format!("a <{}> tag has no name attribute", tag.name))?;
            Ok(Control { name: name.to_string(), values: children(index, child) })
        };
        let (index, region_kind) = tags
            .iter()
            .enumerate()
            .filter(|(_, t)| t.targets(&image_name))
            .find_map(|(i, t)| match t.name.as_str() {
                "BrushLabels" => Some((i, RegionKind::Brush)),
                "PolygonLabels" => Some((i, RegionKind::Polygon)),
                _ => None,
            })
            .ok_or_else(|| {
                format!(
                    "the labeling config has no <BrushLabels> or <PolygonLabels> tag with toName=\"{image_name}\" \
                     for the predicted masks"
                )
            })?;
        let regions = control(index, "Label")?;
        if regions.values.is_empty() {
            return Err(format!("the <{}> tag \"{}\" has no <Label> values", tags[index].name, regions.name));
        }
        let per_region = |name: &str| {
            tags.iter().position(|t| t.name == name && t.is_per_region() && t.targets(&image_name))
        };
        let description = per_region("TextArea").map(|i| control(i, "")).transpose()?;
        let category = per_region("Choices").map(|i| control(i, "Choice")).transpose()?;
        Ok(Self { image_name, image_field, region_kind, regions, description, category })
    }
}

/// Every element tag in document order, with attributes and parent.
fn scan(xml: &str) -> Result<Vec<Tag>, String> {
    let mut tags = Vec::new();
    let mut open: Vec<(String, usize)> = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find('<') {
        rest = &rest[start..];
        if let Some(after) = rest.strip_prefix("<!--") {
            let end = after.find("-->").ok_or("the labeling config has an unclosed comment")?;
            rest = &after[end + 3..];
            continue;
        }
        if let Some(after) = rest.strip_prefix("<![CDATA[") {
            let end = after.find("]]>").ok_or("the labeling config has an unclosed CDATA section")?;
            rest = &after[end + 3..];
            continue;
        }
        let end = tag_end(rest).ok_or("the labeling config has an unclosed tag")?;
        let body = &rest[1..end];
        rest = &rest[end + 1..];
        if body.starts_with('?') || body.starts_with('!') {
            continue;
        }
        if let Some(name) = body.strip_prefix('/') {
            let name = name.trim();
            // Close up to the matching open tag (forgiving stray closers).
            if let Some(position) = open.iter().rposition(|(n, _)| n == name) {
                open.truncate(position);
            }
            continue;
        }
        let self_closing = body.trim_end().ends_with('/');
        let body = body.trim_end().trim_end_matches('/');
        let name_end = body.find(|c: char| c.is_whitespace()).unwrap_or(body.len());
        let name = body[..name_end].to_string();
        if name.is_empty() {
            return Err("the labeling config has a tag without a name".into());
        }
        let attributes = attributes(&body[name_end..])?;
        let index = tags.len();
        tags.push(Tag { name: name.clone(), attributes, parent: open.last().map(|(_, i)| *i) });
        if !self_closing {
            open.push((name, index));
        }
    }
    Ok(tags)
}

/// The `>` ending the tag that starts `text`, outside quoted attribute values.
fn tag_end(text: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(i),
            _ => {}
        }
    }
    None
}

fn attributes(mut text: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    loop {
        text = text.trim_start();
        if text.is_empty() {
            return Ok(out);
        }
        let eq = text.find('=').ok_or_else(|| format!("malformed attribute near {:?}", head(text)))?;
        let name = text[..eq].trim().to_string();
        let value = text[eq + 1..].trim_start();
        let quote = value.chars().next().filter(|c| *c == '"' || *c == '\'');
        let quote = quote.ok_or_else(|| format!("attribute {name} needs a quoted value"))?;
        let close =
            value[1..].find(quote).ok_or_else(|| format!("attribute {name} has an unclosed value"))?;
        out.insert(name, unescape(&value[1..1 + close]));
        text = &value[close + 2..];
    }
}

fn head(text: &str) -> &str {
    let end = text.char_indices().nth(20).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

fn unescape(value: &str) -> String {
    value
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r##"<View>
  <!-- <BrushLabels name="commented" toName="img"/> -->
  <Image name="img" value="$photo" zoom="true"/>
  <KeyPointLabels name="kp" toName="img" smart="true"><Label value="Object" smart="true"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="img" smart="true"><Label value="Object"/></RectangleLabels>
  <BrushLabels name="mask" toName="img">
    <Label value="Object" background="#ff0000"/>
    <Label value="Cat &amp; dog"/>
  </BrushLabels>
  <TextArea name="caption" toName="img" perRegion="true" editable="true"/>
  <TextArea name="notes" toName="img"/>
  <Choices name="category" toName="img" perRegion="true"><Choice value="cat"/><Choice value='dog'/></Choices>
</View>"##;

    #[test]
    fn reads_the_tags_of_a_full_config() {
        let config = LabelConfig::parse(FULL).unwrap();
        assert_eq!(config.image_name, "img");
        assert_eq!(config.image_field, "photo");
        assert_eq!(config.region_kind, RegionKind::Brush);
        assert_eq!(
            config.regions,
            Control { name: "mask".into(), values: vec!["Object".into(), "Cat & dog".into()] }
        );
        assert_eq!(config.description.unwrap().name, "caption");
        assert_eq!(config.category.unwrap().values, vec!["cat", "dog"]);
    }

    #[test]
    fn polygons_and_no_per_region_controls() {
        let config = LabelConfig::parse(
            r#"<View><Image name="image" value="$image"/><PolygonLabels name="poly" toName="image"><Label value="A"/></PolygonLabels><TextArea name="t" toName="image"/></View>"#,
        )
        .unwrap();
        assert_eq!(config.region_kind, RegionKind::Polygon);
        assert_eq!(config.description, None);
        assert_eq!(config.category, None);
    }

    #[test]
    fn unusable_configs_say_what_is_missing() {
        for (xml, expected) in [
            ("", "empty"),
            (r#"<View><Text name="t" value="$text"/></View>"#, "no <Image> tag"),
            (
                r#"<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image"><Label value="A"/></RectangleLabels></View>"#,
                "no <BrushLabels> or <PolygonLabels> tag with toName=\"image\"",
            ),
            (
                r#"<View><Image name="image" value="$image"/><BrushLabels name="b" toName="other"><Label value="A"/></BrushLabels></View>"#,
                "no <BrushLabels>",
            ),
            (
                r#"<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image"/></View>"#,
                "no <Label> values",
            ),
            (r#"<View><Image name="image" value="image"/></View>"#, "must name a task field"),
            (r#"<View><Image name="image" value="$image"</View>"#, "attribute"),
            (r#"<View><!-- open"#, "unclosed comment"),
        ] {
            let err = LabelConfig::parse(xml).unwrap_err();
            assert!(err.contains(expected), "{xml}: {err}");
        }
    }
}
