//! Validated request shapes: every check the gateway makes on a public request, in one place and
//! before any work (bad input is INVALID_ARGUMENT naming the field). Nothing here does I/O: a
//! region's mask is checked against the image size by [`region_masks`] once that size is known.
//! What the workers will be sent leaves here in the worker vocabulary (osprey_proto::convert maps
//! it): SAM prompts and parameters, the LLM's task and generation parameters.

use osprey_common::ServiceError;
use osprey_common::image::{ImageLimits, RgbImage, decode_image};
use osprey_common::mask::{Mask, mask_from_proto};
use osprey_proto::v1;
use osprey_proto::worker::v1 as worker;

/// The limits requests are held to.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_regions: usize,
    pub max_question_bytes: usize,
    /// Most `everything.points_per_side`.
    pub max_points_per_side: u32,
    /// Most regions x `max_new_tokens` in one Describe or Annotate item.
    pub max_request_tokens: u64,
    pub image: ImageLimits,
}

/// The LLM worker's `--default-max-new-tokens` as shipped: what a region without
/// `parameters.max_new_tokens` counts toward `--max-request-tokens`.
pub const ASSUMED_MAX_NEW_TOKENS: u32 = 512;

/// The image of a request.
#[derive(Debug)]
pub enum ImageInput {
    /// Sent as an encoded file, decoded here.
    Decoded(RgbImage),
    /// A key from RegisterImage; the gateway's cache holds its pixels.
    Registered(String),
}

/// Where a region's mask comes from.
#[derive(Debug, Clone)]
pub enum RegionSource {
    /// Given by the client (decoded once the image size is known).
    Mask(v1::Mask),
    /// Made by SAM from a prompt.
    Prompt(worker::SamPrompt),
}

/// The image and regions of a Describe, Ask, Chat or Annotate request.
#[derive(Debug)]
pub struct RegionsInput {
    pub image: ImageInput,
    pub sources: Vec<RegionSource>,
    pub labels: Vec<String>,
    /// SAM's automatic masks over the whole image become the regions.
    pub everything: Option<worker::EverythingParams>,
}

/// A Describe request (or Annotate item), validated.
#[derive(Debug)]
pub struct DescribeInput {
    pub regions: RegionsInput,
    pub task: worker::RegionTask,
    pub parameters: Option<worker::GenerationParameters>,
}

/// An Ask or Chat request, validated.
#[derive(Debug)]
pub struct QuestionInput {
    pub regions: RegionsInput,
    pub question: String,
    /// `question` is the whole user message (see `AskRequest.verbatim`).
    pub verbatim: bool,
    pub history: Vec<v1::Turn>,
    pub parameters: Option<worker::GenerationParameters>,
}

/// A Segment request, validated.
#[derive(Debug)]
pub struct SegmentInput {
    pub image: ImageInput,
    pub work: SegmentWork,
}

#[derive(Debug)]
pub enum SegmentWork {
    Prompts(Vec<worker::SamPrompt>),
    Everything(worker::EverythingParams),
}

/// A RegisterImage request's image, decoded.
pub fn register(request: &v1::RegisterImageRequest, limits: &Limits) -> Result<RgbImage, ServiceError> {
    decode_image(&request.encoded, &limits.image).map_err(|e| ServiceError::invalid("encoded", e))
}

pub fn describe(request: v1::DescribeRequest, limits: &Limits) -> Result<DescribeInput, ServiceError> {
    let v1::DescribeRequest { image, regions, everything, task, parameters } = request;
    describe_parts(image, regions, everything, task, parameters, limits)
}

pub fn annotate_item(item: v1::AnnotateRequest, limits: &Limits) -> Result<DescribeInput, ServiceError> {
    let v1::AnnotateRequest { image, regions, everything, task, parameters, .. } = item;
    describe_parts(image, regions, everything, task, parameters, limits)
}

fn describe_parts(
    image: Option<v1::Image>,
    regions: Vec<v1::Region>,
    everything: Option<v1::EverythingParams>,
    task: i32,
    parameters: Option<v1::GenerationParameters>,
    limits: &Limits,
) -> Result<DescribeInput, ServiceError> {
    let task = describe_task(task)?;
    check_parameters(parameters.as_ref())?;
    if regions.is_empty() && everything.is_none() {
        return Err(ServiceError::invalid("regions", "at least one region is needed"));
    }
    let everything = everything.map(|params| capped_masks(params, limits)).transpose()?;
    let regions = regions_input(image, regions, everything, limits)?;
    check_tokens(&regions, parameters.as_ref(), limits)?;
    Ok(DescribeInput { regions, task, parameters: parameters.map(Into::into) })
}

pub fn ask(request: v1::AskRequest, limits: &Limits) -> Result<QuestionInput, ServiceError> {
    let v1::AskRequest { image, regions, question, parameters, verbatim } = request;
    question_parts(image, regions, vec![], question, verbatim, parameters, limits)
}

pub fn chat(request: v1::ChatRequest, limits: &Limits) -> Result<QuestionInput, ServiceError> {
    let v1::ChatRequest { image, regions, history, question, parameters } = request;
    question_parts(image, regions, history, question, false, parameters, limits)
}

fn question_parts(
    image: Option<v1::Image>,
    regions: Vec<v1::Region>,
    history: Vec<v1::Turn>,
    question: String,
    verbatim: bool,
    parameters: Option<v1::GenerationParameters>,
    limits: &Limits,
) -> Result<QuestionInput, ServiceError> {
    if question.trim().is_empty() {
        return Err(ServiceError::invalid("question", "must not be empty"));
    }
    if question.len() > limits.max_question_bytes {
        return Err(ServiceError::invalid(
            "question",
            format!("{} bytes, over the limit of {}", question.len(), limits.max_question_bytes),
        ));
    }
    check_parameters(parameters.as_ref())?;
    if verbatim {
        check_verbatim(&question, regions.len())?;
    }
    let regions = regions_input(image, regions, None, limits)?;
    Ok(QuestionInput { regions, question, verbatim, history, parameters: parameters.map(Into::into) })
}

pub fn segment(request: v1::SegmentRequest, limits: &Limits) -> Result<SegmentInput, ServiceError> {
    let v1::SegmentRequest { image, prompts, everything } = request;
    let image = image_input(image, limits)?;
    let work = match (everything, prompts.is_empty()) {
        (Some(_), false) => {
            return Err(ServiceError::invalid("everything", "send either prompts or everything"));
        }
        (None, true) => {
            return Err(ServiceError::invalid("prompts", "at least one prompt (or everything) is needed"));
        }
        (None, false) => SegmentWork::Prompts(prompts.into_iter().map(Into::into).collect()),
        (Some(params), true) => SegmentWork::Everything(checked_grid(params, limits)?.into()),
    };
    Ok(SegmentInput { image, work })
}

/// Regions x new tokens held to `--max-request-tokens` (each region of a Describe is one answer).
fn check_tokens(
    regions: &RegionsInput,
    parameters: Option<&v1::GenerationParameters>,
    limits: &Limits,
) -> Result<(), ServiceError> {
    let everything = regions.everything.as_ref().map(|p| u64::from(p.max_masks.unwrap_or(0)));
    let answers = regions.sources.len() as u64 + everything.unwrap_or(0);
    let asked = parameters.and_then(|p| p.max_new_tokens);
    let tokens = u64::from(asked.unwrap_or(ASSUMED_MAX_NEW_TOKENS));
    if answers * tokens <= limits.max_request_tokens {
        return Ok(());
    }
    let field = if asked.is_some() { "parameters.max_new_tokens" } else { "regions" };
    Err(ServiceError::invalid(
        field,
        format!(
            "{answers} regions x {tokens} new tokens is over the limit of {} tokens per request \
             (--max-request-tokens)",
            limits.max_request_tokens
        ),
    ))
}

/// Everything mode's grid held to `--max-points-per-side`.
fn checked_grid(params: v1::EverythingParams, limits: &Limits) -> Result<v1::EverythingParams, ServiceError> {
    if let Some(side) = params.points_per_side
        && side > limits.max_points_per_side
    {
        return Err(ServiceError::invalid(
            "everything.points_per_side",
            format!("{side} is over the limit of {}", limits.max_points_per_side),
        ));
    }
    Ok(params)
}

/// Everything mode as regions to describe: its grid checked, and at most `--max-regions` masks
/// (the default when `max_masks` is unset).
fn capped_masks(params: v1::EverythingParams, limits: &Limits) -> Result<v1::EverythingParams, ServiceError> {
    let mut params = checked_grid(params, limits)?;
    let max_regions = u32::try_from(limits.max_regions).unwrap_or(u32::MAX);
    match params.max_masks {
        Some(masks) if masks > max_regions => {
            return Err(ServiceError::invalid(
                "everything.max_masks",
                format!("{masks} regions, over the limit of {max_regions}"),
            ));
        }
        Some(_) => {}
        None => params.max_masks = Some(max_regions),
    }
    Ok(params)
}

fn regions_input(
    image: Option<v1::Image>,
    regions: Vec<v1::Region>,
    everything: Option<v1::EverythingParams>,
    limits: &Limits,
) -> Result<RegionsInput, ServiceError> {
    if regions.len() > limits.max_regions {
        return Err(ServiceError::invalid(
            "regions",
            format!("{} regions, over the limit of {}", regions.len(), limits.max_regions),
        ));
    }
    if everything.is_some() && !regions.is_empty() {
        return Err(ServiceError::invalid("everything", "send either regions or everything, not both"));
    }
    let image = image_input(image, limits)?;
    let mut sources = Vec::with_capacity(regions.len());
    let mut labels = Vec::with_capacity(regions.len());
    for (i, region) in regions.into_iter().enumerate() {
        sources.push(match region.source {
            Some(v1::region::Source::Mask(mask)) => RegionSource::Mask(mask),
            Some(v1::region::Source::Prompt(prompt)) => RegionSource::Prompt(prompt.into()),
            None => return Err(ServiceError::invalid(format!("regions[{i}]"), "set `mask` or `prompt`")),
        });
        labels.push(region.label);
    }
    Ok(RegionsInput { image, sources, labels, everything: everything.map(Into::into) })
}

fn image_input(image: Option<v1::Image>, limits: &Limits) -> Result<ImageInput, ServiceError> {
    match image.and_then(|i| i.source) {
        Some(v1::image::Source::Encoded(bytes)) => decode_image(&bytes, &limits.image)
            .map(ImageInput::Decoded)
            .map_err(|e| ServiceError::invalid("image.encoded", e)),
        Some(v1::image::Source::Key(key)) => Ok(ImageInput::Registered(key)),
        None => Err(ServiceError::invalid("image", "required: set `encoded` or `key`")),
    }
}

/// The client's masks decoded against the image size (`None` for regions SAM will make).
pub fn region_masks(
    sources: &[RegionSource],
    height: u32,
    width: u32,
    limits: &Limits,
) -> Result<Vec<Option<Mask>>, ServiceError> {
    sources
        .iter()
        .enumerate()
        .map(|(i, source)| match source {
            RegionSource::Mask(mask) => {
                let field = || format!("regions[{i}].mask");
                let mask = mask_from_proto(mask, height, width, &limits.image)
                    .map_err(|e| ServiceError::invalid(field(), e))?;
                // Pooling divides by the mask's area: an empty mask has no region to describe.
                if mask.area() == 0 {
                    return Err(ServiceError::invalid(field(), "the mask is empty (no pixel is set)"));
                }
                Ok(Some(mask))
            }
            RegionSource::Prompt(_) => Ok(None),
        })
        .collect()
}

fn describe_task(task: i32) -> Result<worker::RegionTask, ServiceError> {
    v1::DescribeTask::try_from(task)
        .map(Into::into)
        .map_err(|_| ServiceError::invalid("task", format!("unknown task {task}")))
}

fn check_parameters(p: Option<&v1::GenerationParameters>) -> Result<(), ServiceError> {
    let Some(p) = p else { return Ok(()) };
    if let Some(t) = p.temperature
        && !(t.is_finite() && t >= 0.0)
    {
        return Err(ServiceError::invalid(
            "parameters.temperature",
            format!("must be finite and >= 0, got {t}"),
        ));
    }
    if let Some(top_p) = p.top_p
        && !(top_p > 0.0 && top_p <= 1.0)
    {
        return Err(ServiceError::invalid("parameters.top_p", format!("must be in (0, 1], got {top_p}")));
    }
    if p.max_new_tokens == Some(0) {
        return Err(ServiceError::invalid("parameters.max_new_tokens", "must be at least 1"));
    }
    Ok(())
}

/// A verbatim question names the image once and every region by one `<mask><pos>` pair; the LLM
/// worker checks the exact layout. Checked before any region work, so a miscounted question costs
/// no SAM or image work.
fn check_verbatim(question: &str, regions: usize) -> Result<(), ServiceError> {
    let images = question.matches("<image>").count();
    if images != 1 {
        return Err(ServiceError::invalid("question", format!("verbatim: {images} `<image>`, expected 1")));
    }
    let pairs = question.matches("<mask><pos>").count();
    if pairs != regions {
        return Err(ServiceError::invalid(
            "question",
            format!("verbatim: {pairs} `<mask><pos>` pairs for {regions} regions"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_regions: 2,
            max_question_bytes: 32,
            max_points_per_side: 16,
            max_request_tokens: 1024,
            image: ImageLimits::default(),
        }
    }

    fn key_image() -> Option<v1::Image> {
        Some(v1::Image { source: Some(v1::image::Source::Key("k".into())) })
    }

    fn prompt_region() -> v1::Region {
        v1::Region { source: Some(v1::region::Source::Prompt(v1::SamPrompt::default())), label: "a".into() }
    }

    /// The field an INVALID_ARGUMENT names.
    fn field<T: std::fmt::Debug>(result: Result<T, ServiceError>) -> String {
        match result {
            Err(ServiceError::InvalidField { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn describe_checks_each_field() {
        let ok =
            v1::DescribeRequest { image: key_image(), regions: vec![prompt_region()], ..Default::default() };
        let input = describe(ok.clone(), &limits()).unwrap();
        assert!(matches!(input.regions.image, ImageInput::Registered(ref k) if k == "k"));
        assert_eq!(input.regions.labels, ["a"]);
        assert_eq!(input.task, worker::RegionTask::Short);

        let cases: Vec<(v1::DescribeRequest, &str)> = vec![
            (v1::DescribeRequest { task: 9, ..ok.clone() }, "task"),
            (v1::DescribeRequest { regions: vec![], ..ok.clone() }, "regions"),
            (v1::DescribeRequest { regions: vec![prompt_region(); 3], ..ok.clone() }, "regions"),
            (v1::DescribeRequest { everything: Some(Default::default()), ..ok.clone() }, "everything"),
            (v1::DescribeRequest { image: None, ..ok.clone() }, "image"),
            (
                v1::DescribeRequest {
                    image: Some(v1::Image {
                        source: Some(v1::image::Source::Encoded(b"not an image".to_vec())),
                    }),
                    ..ok.clone()
                },
                "image.encoded",
            ),
            (
                v1::DescribeRequest { regions: vec![prompt_region(), v1::Region::default()], ..ok.clone() },
                "regions[1]",
            ),
            (
                v1::DescribeRequest {
                    parameters: Some(v1::GenerationParameters {
                        temperature: Some(-1.0),
                        ..Default::default()
                    }),
                    ..ok.clone()
                },
                "parameters.temperature",
            ),
            (
                v1::DescribeRequest {
                    parameters: Some(v1::GenerationParameters { top_p: Some(0.0), ..Default::default() }),
                    ..ok.clone()
                },
                "parameters.top_p",
            ),
            (
                v1::DescribeRequest {
                    parameters: Some(v1::GenerationParameters {
                        max_new_tokens: Some(0),
                        ..Default::default()
                    }),
                    ..ok.clone()
                },
                "parameters.max_new_tokens",
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(field(describe(request.clone(), &limits())), expected, "{request:?}");
        }
        // Everything mode alone needs no regions.
        let everything = v1::DescribeRequest { regions: vec![], everything: Some(Default::default()), ..ok };
        assert!(describe(everything, &limits()).unwrap().regions.everything.is_some());
    }

    #[test]
    fn the_costliest_requests_are_capped() {
        let one =
            v1::DescribeRequest { image: key_image(), regions: vec![prompt_region()], ..Default::default() };
        let tokens = |n| Some(v1::GenerationParameters { max_new_tokens: Some(n), ..Default::default() });
        // 1 region x 1024 tokens is the limit; 2 x 512 (the assumed default) too; 2 x 513 is over.
        assert!(describe(v1::DescribeRequest { parameters: tokens(1024), ..one.clone() }, &limits()).is_ok());
        let two = v1::DescribeRequest { regions: vec![prompt_region(); 2], ..one.clone() };
        assert!(describe(two.clone(), &limits()).is_ok());
        let over =
            describe(v1::DescribeRequest { parameters: tokens(513), ..two.clone() }, &limits()).unwrap_err();
        assert_eq!(over.field(), Some("parameters.max_new_tokens"));
        assert!(over.to_string().contains("2 regions x 513 new tokens is over the limit of 1024"), "{over}");
        let tight = Limits { max_request_tokens: 1000, ..limits() };
        assert_eq!(field(describe(two, &tight)), "regions");
        assert_eq!(
            field(annotate_item(
                v1::AnnotateRequest {
                    parameters: tokens(1025),
                    image: key_image(),
                    regions: vec![prompt_region()],
                    ..Default::default()
                },
                &limits()
            )),
            "parameters.max_new_tokens"
        );

        // Everything mode: the grid, and max_masks counted as regions (unset: --max-regions).
        let grid =
            |side, max_masks| v1::EverythingParams { points_per_side: side, max_masks, ..Default::default() };
        let everything =
            |params| v1::DescribeRequest { regions: vec![], everything: Some(params), ..one.clone() };
        let input = describe(everything(grid(Some(16), None)), &limits()).unwrap();
        assert_eq!(input.regions.everything.unwrap().max_masks, Some(2));
        assert_eq!(
            field(describe(everything(grid(Some(17), None)), &limits())),
            "everything.points_per_side"
        );
        assert_eq!(field(describe(everything(grid(None, Some(3))), &limits())), "everything.max_masks");
        let everything_tokens =
            v1::DescribeRequest { parameters: tokens(600), ..everything(grid(None, None)) };
        assert_eq!(field(describe(everything_tokens, &limits())), "parameters.max_new_tokens");
        let one_mask = v1::DescribeRequest { parameters: tokens(600), ..everything(grid(None, Some(1))) };
        assert!(describe(one_mask, &limits()).is_ok());
        let segment_grid = |side| v1::SegmentRequest {
            image: key_image(),
            prompts: vec![],
            everything: Some(grid(Some(side), None)),
        };
        assert!(segment(segment_grid(16), &limits()).is_ok());
        assert_eq!(field(segment(segment_grid(17), &limits())), "everything.points_per_side");
    }

    #[test]
    fn questions_are_checked_before_regions() {
        let ok = v1::AskRequest { image: key_image(), question: "what?".into(), ..Default::default() };
        assert_eq!(ask(ok.clone(), &limits()).unwrap().question, "what?");
        assert_eq!(field(ask(v1::AskRequest { question: "  ".into(), ..ok.clone() }, &limits())), "question");
        let long = "x".repeat(33);
        assert_eq!(field(ask(v1::AskRequest { question: long, ..ok.clone() }, &limits())), "question");
        // A miscounted verbatim question is refused even with a missing image.
        let verbatim = v1::AskRequest {
            image: None,
            question: "<image> <mask><pos>".into(),
            verbatim: true,
            ..ok.clone()
        };
        assert_eq!(field(ask(verbatim.clone(), &limits())), "question");
        let counted = v1::AskRequest { image: key_image(), regions: vec![prompt_region()], ..verbatim };
        assert!(ask(counted, &limits()).unwrap().verbatim);

        let chat_request = v1::ChatRequest {
            image: key_image(),
            history: vec![v1::Turn { question: "q".into(), answer: "a".into() }],
            question: "and?".into(),
            ..Default::default()
        };
        let input = chat(chat_request, &limits()).unwrap();
        assert_eq!(input.history.len(), 1);
        assert!(!input.verbatim);
    }

    #[test]
    fn segment_wants_prompts_or_everything() {
        let ok = v1::SegmentRequest {
            image: key_image(),
            prompts: vec![v1::SamPrompt::default()],
            everything: None,
        };
        assert!(
            matches!(segment(ok.clone(), &limits()).unwrap().work, SegmentWork::Prompts(ref p) if p.len() == 1)
        );
        let both = v1::SegmentRequest { everything: Some(Default::default()), ..ok.clone() };
        assert_eq!(field(segment(both, &limits())), "everything");
        let neither = v1::SegmentRequest { prompts: vec![], ..ok.clone() };
        assert_eq!(field(segment(neither, &limits())), "prompts");
        let everything = v1::SegmentRequest { prompts: vec![], everything: Some(Default::default()), ..ok };
        assert!(matches!(segment(everything, &limits()).unwrap().work, SegmentWork::Everything(_)));
        assert_eq!(field(register(&v1::RegisterImageRequest::default(), &limits())), "encoded");
    }

    #[test]
    fn masks_are_checked_against_the_image_size() {
        let mask = |height, width, pixel: bool| {
            let mut values = vec![0u8; (height * width) as usize];
            values[0] = u8::from(pixel);
            let mask = Mask::from_row_major(height, width, &values).unwrap();
            let rle = osprey_common::mask::rle_to_proto(&mask.to_rle());
            RegionSource::Mask(v1::Mask { format: Some(v1::mask::Format::Rle(rle)) })
        };
        let sources = [mask(4, 5, true), RegionSource::Prompt(worker::SamPrompt::default())];
        let masks = region_masks(&sources, 4, 5, &limits()).unwrap();
        assert!(masks[0].is_some() && masks[1].is_none());
        assert_eq!(field(region_masks(&sources, 5, 5, &limits())), "regions[0].mask");
        let empty = [RegionSource::Prompt(worker::SamPrompt::default()), mask(4, 5, false)];
        assert_eq!(field(region_masks(&empty, 4, 5, &limits())), "regions[1].mask");
    }
}
