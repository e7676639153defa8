// The C++ API as an application sees it: only the public header (it must compile on its own),
// the demo model answering its reference questions in a follow-up conversation, streaming and
// logprobs, the application's own Vulkan device, and errors as messages.
#include "vkvlm/vkvlm.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <mutex>
#include <thread>
#include <stdexcept>
#include <string>

namespace {

const std::string k_demo = VKVLM_SOURCE_DIR "/models/shapes-llava";

std::string user_with_image(const std::string& text) {
  return R"([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ")" + text + R"("}]}])";
}

// Raw RGB pixels (decoded from shapes_0.png by PIL into tests/data) answer as the PNG does.
TEST(CppApi, RawRgbPixelsAnswerAsTheEncodedFileDoes) {
  const auto pixels = vkvlm::read_file(VKVLM_SOURCE_DIR "/tests/data/shapes_0_192x192.rgb");
  ASSERT_EQ(pixels.size(), 192u * 192u * 3u);
  auto engine = vkvlm::Engine::load(k_demo);
  vkvlm::Chat chat(*engine, 512);
  auto r = chat.generate(user_with_image("What color is the square?"), {vkvlm::rgb_image(pixels.data(), 192, 192)});
  EXPECT_EQ(r.text, "The square is orange.");
  EXPECT_EQ(r.finish_reason, "stop");
  EXPECT_THROW(vkvlm::rgb_image(nullptr, 192, 192), std::invalid_argument);
  EXPECT_THROW(vkvlm::rgb_image(pixels.data(), 0, 192), std::invalid_argument);
}

TEST(CppApi, ChatAnswersStreamsAndReusesItsCache) {
  auto engine = vkvlm::Engine::load(k_demo);
  EXPECT_NE(engine->info(512).find("architecture: llava"), std::string::npos);
  vkvlm::Chat chat(*engine, 512);
  const auto png = vkvlm::read_file(k_demo + "/examples/shapes_0.png");
  std::string streamed;
  vkvlm::GenerateOptions o;
  o.logprobs = true;
  o.top_logprobs = 2;
  auto r = chat.generate(user_with_image("What color is the square?"), {png}, o, [&](const vkvlm::Step& s) {
    streamed += s.text;
    return true;
  });
  EXPECT_EQ(r.text, "The square is orange.");
  EXPECT_EQ(streamed, r.text);
  EXPECT_EQ(r.finish_reason, "stop");
  ASSERT_EQ(r.steps.size(), r.tokens.size());
  for (auto& s : r.steps) {
    EXPECT_LE(s.logprob, 0.0f);
    ASSERT_EQ(s.top_logprobs.size(), 2u);
    EXPECT_GE(s.top_logprobs[0].second + 1e-4f, s.logprob);  // greedy: the chosen token is the best
  }
  // The same image again in a follow-up turn: its rows come from the cache.
  const std::string follow = R"([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]},
      {"role": "assistant", "content": "The square is orange."},
      {"role": "user", "content": "And how many shapes are there?"}])";
  auto again = chat.generate(follow, {png});
  EXPECT_GT(again.cached_tokens, int64_t(r.prompt_tokens.size()) - 1);
  // A callback that stops the generation.
  auto cut = chat.generate(user_with_image("Describe the image."), {png}, {}, [](const vkvlm::Step&) { return false; });
  EXPECT_EQ(cut.finish_reason, "cancelled");
  EXPECT_EQ(cut.tokens.size(), 1u);
}

TEST(CppApi, ErrorsAreMessages) {
  try {
    vkvlm::Engine::load("/nonexistent/model");
    FAIL() << "should throw";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/model"), std::string::npos) << e.what();
  }
  auto engine = vkvlm::Engine::load(k_demo);
  vkvlm::Chat chat(*engine, 512);
  auto expect = [&](const std::string& msgs, std::vector<std::vector<uint8_t>> images, const char* word) {
    try {
      chat.generate(msgs, images);
      ADD_FAILURE() << "should throw";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    }
  };
  expect("[not json", {}, "not valid JSON");
  expect(user_with_image("Hi"), {}, "1 {\"type\": \"image\"} part(s)");
  expect(user_with_image("Hi"), {{1, 2, 3}}, "image 0");
  expect(R"([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}])", {}, "data: URL");
}

TEST(CppApi, RunsOnTheApplicationsDevice) {
  VkApplicationInfo app{VK_STRUCTURE_TYPE_APPLICATION_INFO};
  app.apiVersion = VK_API_VERSION_1_2;
  VkInstanceCreateInfo ci{VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO};
  ci.pApplicationInfo = &app;
  VkInstance instance = VK_NULL_HANDLE;
  ASSERT_EQ(vkCreateInstance(&ci, nullptr, &instance), VK_SUCCESS);
  uint32_t n = 1;
  VkPhysicalDevice physical = VK_NULL_HANDLE;
  vkEnumeratePhysicalDevices(instance, &n, &physical);
  float prio = 1.0f;
  VkDeviceQueueCreateInfo qi{VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO};
  qi.queueFamilyIndex = 0;
  qi.queueCount = 1;
  qi.pQueuePriorities = &prio;
  VkDeviceCreateInfo di{VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO};
  di.queueCreateInfoCount = 1;
  di.pQueueCreateInfos = &qi;
  VkDevice device = VK_NULL_HANDLE;
  ASSERT_EQ(vkCreateDevice(physical, &di, nullptr, &device), VK_SUCCESS);
  {
    vkvlm::VulkanDevice d;
    d.instance = instance;
    d.physical_device = physical;
    d.device = device;
    auto engine = vkvlm::Engine::load_on_device(k_demo, d);
    vkvlm::Chat chat(*engine, 512);
    auto r = chat.generate(user_with_image("What color is the square?"), {vkvlm::read_file(k_demo + "/examples/shapes_0.png")});
    EXPECT_EQ(r.text, "The square is orange.");
  }
  {
    // The application submits to the same queue from its own thread, under its lock, which it
    // hands to vkvlm: every vkvlm submit and wait takes it, and the answer is the same.
    std::mutex queue_mutex;
    std::atomic<int> held{0}, taken{0};
    std::atomic<bool> overlapped{false}, done{false};
    vkvlm::VulkanDevice d;
    d.instance = instance;
    d.physical_device = physical;
    d.device = device;
    d.lock_queue = [&] {
      queue_mutex.lock();
      if (++held != 1) overlapped = true;
      ++taken;
    };
    d.unlock_queue = [&] {
      --held;
      queue_mutex.unlock();
    };
    VkQueue queue = VK_NULL_HANDLE;
    vkGetDeviceQueue(device, 0, 0, &queue);
    std::thread app_thread([&] {
      while (!done) {
        std::lock_guard<std::mutex> l(queue_mutex);
        if (++held != 1) overlapped = true;
        EXPECT_EQ(vkQueueWaitIdle(queue), VK_SUCCESS);
        --held;
      }
    });
    auto engine = vkvlm::Engine::load_on_device(k_demo, d);
    vkvlm::Chat chat(*engine, 512);
    auto r = chat.generate(user_with_image("What color is the square?"), {vkvlm::read_file(k_demo + "/examples/shapes_0.png")});
    done = true;
    app_thread.join();
    EXPECT_EQ(r.text, "The square is orange.");
    EXPECT_GT(taken.load(), 0) << "vkvlm took the application's queue lock";
    EXPECT_FALSE(overlapped.load()) << "the queue was never used by both at once";
    d.unlock_queue = nullptr;
    EXPECT_THROW(vkvlm::Engine::load_on_device(k_demo, d), std::exception) << "a lock without an unlock is refused";
  }
  // Still the application's: usable, then destroyed by it.
  EXPECT_EQ(vkDeviceWaitIdle(device), VK_SUCCESS);
  vkDestroyDevice(device, nullptr);
  vkDestroyInstance(instance, nullptr);
}

}  // namespace
