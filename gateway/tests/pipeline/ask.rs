//! Ask's verbatim questions; Ask and Chat when the LLM worker's answer stream ends early.

use osprey_proto::v1::{self, DescribeTask};
use osprey_proto::worker::v1 as worker;
use osprey_proto::worker::v1::llm_server::{Llm, LlmServer};
use tonic::{Code, Request, Response, Status};

use crate::support::*;

/// `Ask` with `verbatim` sends the user message as written: the category task's own wording gives
/// `Describe(CATEGORY)`'s raw answer for the same region; a pair count that is not the region count
/// is INVALID_ARGUMENT on `question`.
#[tokio::test]
async fn verbatim_questions_reach_the_llm_as_written() {
    let (vision, llm) = (vision().await, llm().await);
    let (_gateway, mut client) = gateway(&[&vision], &llm, &[]).await;
    let image = v1::image::Source::Encoded(photo());
    let category = v1::DescribeRequest {
        task: DescribeTask::Category as i32,
        ..describe_request(image.clone(), masks(&[4]))
    };
    let described = describe(&mut client, category).await;
    let ask = |question: &str| v1::AskRequest {
        image: Some(v1::Image { source: Some(image.clone()) }),
        regions: masks(&[4]),
        question: question.into(),
        parameters: None,
        verbatim: true,
    };
    let category_question = "<image>\nThis provides an overview of the picture.\nWhat is the category of \
                             <mask><pos>? Using only one word or phrase.";
    let asked = client.ask(ask(category_question)).await.unwrap().into_inner();
    assert_eq!(asked.raw_text, described[0].raw_text);

    for (question, message) in [
        ("<image>\n<mask><pos> and <mask><pos>?", "question: verbatim: 2 `<mask><pos>` pairs for 1 regions"),
        ("What is <mask><pos>?", "question: verbatim: 0 `<image>`, expected 1"),
        ("<image>\nWhat is <mask> <pos>?", "question"),
    ] {
        let status = client.ask(ask(question)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{question}: {status:?}");
        assert!(status.message().starts_with(message), "{question}: {:?}", status.message());
    }
    // The count is checked before any region work: a SAM prompt region is refused on the question,
    // not sent to SAM (this gateway has no SAM worker, which would be FAILED_PRECONDITION).
    let point = v1::Point { x: 80.0, y: 50.0, label: v1::PointLabel::Foreground as i32 };
    let prompt = v1::region::Source::Prompt(v1::SamPrompt { points: vec![point], ..Default::default() });
    let mut prompted = ask("<image>\n<mask><pos> and <mask><pos>?");
    prompted.regions = vec![v1::Region { source: Some(prompt), label: String::new() }];
    let status = client.ask(prompted).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("question: verbatim: 2"), "{:?}", status.message());
}

/// An LLM worker whose answer stream ends, without an error, before its last chunk.
struct CutShort;

#[tonic::async_trait]
impl Llm for CutShort {
    type GenerateStream = tokio_stream::Iter<std::vec::IntoIter<Result<worker::GenerateResponse, Status>>>;

    async fn generate(
        &self,
        _: Request<worker::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let partial = worker::GenerateResponse { text: "a cat on".into(), ..Default::default() };
        Ok(Response::new(tokio_stream::iter(vec![Ok(partial)])))
    }
}

/// A cut answer is never passed on as a whole one: Ask and Chat end with INTERNAL (Chat after the
/// chunks it had), not OK.
#[tokio::test]
async fn an_answer_stream_that_ends_early_is_an_error_not_a_short_answer() {
    let vision = vision().await;
    let llm = osprey_test_support::serve_in_process(|listener, stopped| async move {
        let (routes, health) = osprey_common::grpc::standard_routes(&["osprey.worker.v1.Llm"]).await;
        health.set_serving().await;
        osprey_common::grpc::serve(
            listener,
            routes.add_service(LlmServer::new(CutShort)),
            &health,
            None,
            async {
                let _ = stopped.await;
            },
        )
        .await?;
        Ok(())
    })
    .await;
    let (_gateway, mut client) = gateway(&[&vision], &llm, &[]).await;
    let image = Some(v1::Image { source: Some(v1::image::Source::Encoded(photo())) });

    let ask = v1::AskRequest {
        image: image.clone(),
        regions: masks(&[4]),
        question: "What is region1?".into(),
        ..Default::default()
    };
    let status = client.ask(ask).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("ended the answer early"), "{status:?}");

    let chat = v1::ChatRequest {
        image,
        regions: masks(&[4]),
        question: "What is region1?".into(),
        ..Default::default()
    };
    let mut stream = client.chat(chat).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().expect("the partial chunk");
    assert!(!first.finished);
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("ended the answer early"), "{status:?}");
}
